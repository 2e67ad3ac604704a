"""Lookahead: the decay schedule, when the weights jump to the slow copy, and that it changes nothing when off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastcifar.lookahead import Lookahead


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train(net: nn.Module, steps: int, lookahead: Lookahead | None = None, seed: int = 1) -> list[dict]:
    """SGD on random data; returns the state after every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    states = []
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if lookahead is not None:
            lookahead.step()
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    return states


def test_decay_ramps_with_the_cube_of_progress():
    la = Lookahead(tiny_net(), total_steps=100, final_decay=0.8)
    assert la.decay(0) == 0.0
    assert la.decay(50) == pytest.approx(0.8 / 8)
    assert la.decay(100) == pytest.approx(0.8)


def test_zero_decay_leaves_training_unchanged():
    plain = train(tiny_net(), 10)
    net = tiny_net()
    with_la = train(net, 10, Lookahead(net, total_steps=10, final_decay=0.0))  # ends on an update step
    assert all(torch.equal(plain[-1][k], with_la[-1][k]) for k in plain[-1])


def test_updates_every_n_steps_and_ends_on_the_slow_weights(monkeypatch):
    net = tiny_net()
    la = Lookahead(net, total_steps=13, every=5, final_decay=0.9)
    updates = []
    update = la.update
    monkeypatch.setattr(la, "update", lambda decay: (updates.append((la.steps, decay)), update(decay)))
    states = train(net, 13, la)
    plain = train(tiny_net(), 13)
    # every 5 steps with the ramped decay; after the last step the weights take the slow copy (decay 1)
    assert updates == [(5, pytest.approx(la.decay(5))), (10, pytest.approx(la.decay(10))), (13, 1.0)]
    assert all(torch.equal(net.state_dict()[k], la.slow[k]) for k in la.slow)
    assert torch.equal(states[-1]["0.weight"], states[9]["0.weight"])  # steps 11-13 are dropped
    # steps 1-4 are plain SGD; from step 5 on the trajectory differs
    assert all(torch.equal(states[3][k], plain[3][k]) for k in plain[3])
    assert not torch.equal(states[4]["0.weight"], plain[4]["0.weight"])
    # BatchNorm statistics are averaged too; the integer batch counter is left alone
    assert "1.running_mean" in la.slow and "1.num_batches_tracked" not in la.slow
    assert int(net.state_dict()["1.num_batches_tracked"]) == 13


def test_update_is_an_ema_step():
    net = tiny_net()
    la = Lookahead(net, total_steps=10)
    before = {k: v.clone() for k, v in la.slow.items()}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    la.update(0.75)
    expected = 0.75 * before["0.weight"] + 0.25 * (before["0.weight"] + 1.0)
    torch.testing.assert_close(la.slow["0.weight"], expected)
    assert torch.equal(net[0].weight, la.slow["0.weight"])


def test_state_dict_round_trip():
    net = tiny_net()
    la = Lookahead(net, total_steps=20, every=3)
    train(net, 7, la)
    other = Lookahead(tiny_net(seed=5), total_steps=20, every=3)
    other.load_state_dict(la.state_dict())
    assert other.steps == 7
    assert all(torch.equal(other.slow[k], la.slow[k]) for k in la.slow)
    assert all(other.slow[k] is not la.slow[k] for k in la.slow)  # copied, not aliased
