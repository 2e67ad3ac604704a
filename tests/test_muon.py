"""--optimizer muon: torch.optim.Muon on the conv filters (as matrices sharing their storage), SGD for the rest."""

from __future__ import annotations

import copy

import pytest
import torch

from fastcifar.config import TrainConfig
from fastcifar.muon import matrix_view

muon_available = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
CPU = torch.device("cpu")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_matrix_view_shares_the_weights_memory_in_both_layouts(layout):
    weight = torch.randn(4, 3, 3, 3).to(memory_format=layout)
    view = matrix_view(weight)
    assert view.shape == (4, 27) and view.data_ptr() == weight.data_ptr()
    before = weight.clone()
    view.add_(1.0)
    assert torch.equal(weight, before + 1.0)  # no copy: the weight saw the change


@muon_available
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_step_updates_the_filters_as_muon_updates_their_matrices(channels_last):
    """Reference: torch.optim.Muon on a plain 2D copy of each filter bank, with the gradient flattened in the
    standard (out, in*k*k) order; the layout of our view must not change the update."""
    from fastcifar.recipe import build_model, build_optimizer

    torch.manual_seed(0)
    config = TrainConfig(width=4, optimizer="muon", lr=0.1, muon_lr=0.05, muon_momentum=0.6, channels_last=channels_last)
    model = build_model(config, 10, CPU)
    optimizer = build_optimizer(config, model, CPU)
    (model(torch.randn(6, 3, 32, 32).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format))
     ** 2).mean().backward()
    conv = model.layer1[0][0].weight
    before = conv.detach().contiguous().view(conv.shape[0], -1).clone()
    reference = torch.nn.Parameter(before.clone())
    reference.grad = conv.grad.contiguous().view(conv.shape[0], -1).clone()
    torch.optim.Muon([reference], lr=0.05, momentum=0.6, nesterov=True, weight_decay=0.0).step()
    fc_before = model.fc.weight.detach().clone()
    optimizer.step()
    # Muon orthogonalizes in bf16: another column order may round differently on a CPU with native bf16, so
    # the update is compared to 1% of its size rather than bit for bit
    update, expected = conv.detach().contiguous().view(conv.shape[0], -1) - before, reference.detach() - before
    torch.testing.assert_close(update, expected, atol=0.01 * expected.abs().max().item(), rtol=0)
    assert not torch.equal(model.fc.weight, fc_before)  # the rest stepped with SGD
    assert all(p.ndim != 4 for g in optimizer.sgd.param_groups for p in g["params"])


@muon_available
def test_one_cycle_schedules_muon_at_its_own_peak_and_state_round_trips():
    from fastcifar.recipe import build_model, build_optimizer, build_scheduler

    torch.manual_seed(0)
    config = TrainConfig(width=4, optimizer="muon", lr=0.4, muon_lr=0.08, epochs=2, pct_start=0.5, channels_last=False)
    model = build_model(config, 10, CPU)
    optimizer = build_optimizer(config, model, CPU)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=2)
    for _ in range(1):  # to the peak (step 1 of 4)
        (model(torch.randn(4, 3, 32, 32)) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[0] == pytest.approx(0.4) and lrs[-1] == pytest.approx(0.08)
    saved = copy.deepcopy(optimizer.state_dict())
    again = build_optimizer(config, build_model(config, 10, CPU), CPU)
    again.load_state_dict(saved)
    assert [g["lr"] for g in again.param_groups] == pytest.approx(lrs)
    buffers = [again.muon.state[p]["momentum_buffer"] for p in again.views]
    assert buffers and all(b.abs().sum() > 0 for b in buffers)


@pytest.mark.slow
@muon_available
def test_muon_trains_end_to_end_and_refuses_fp16(tmp_path):
    from synthetic import write_learnable_dataset

    from fastcifar.errors import UserError
    from fastcifar.train import train

    data = write_learnable_dataset(tmp_path / "data", train_per_class=4, test_per_class=1)
    summary = train(TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "run"), width=4, batch_size=10, epochs=1,
                                device="cpu", optimizer="muon", plots=False, amp=False))
    assert summary["runs"]["per_seed"][0]["images"] == 40  # every step of the epoch: 4 batches of 10
    with pytest.raises(UserError, match="--optimizer muon with fp16"):
        train(TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "fp16"), width=4, batch_size=10, epochs=1,
                          device="cpu", optimizer="muon", plots=False, amp_dtype="fp16"))
    assert not (tmp_path / "fp16").exists()


CPU = torch.device("cpu")


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_after_a_load_the_groups_a_scheduler_sets_are_the_ones_that_step():
    from fastcifar.recipe import build_model, build_optimizer

    torch.manual_seed(0)
    config = TrainConfig(width=4, optimizer="muon", lr=0.4, muon_lr=0.08, channels_last=False)
    model = build_model(config, 10, CPU)
    optimizer = build_optimizer(config, model, CPU)
    (model(torch.randn(4, 3, 32, 32)) ** 2).mean().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())

    model2 = build_model(config, 10, CPU)
    again = build_optimizer(config, model2, CPU)
    again.load_state_dict(saved)
    inner = again.sgd.param_groups + again.muon.param_groups
    assert len(again.param_groups) == len(inner) and all(a is b for a, b in zip(again.param_groups, inner))
    # behaviour: lr 0 set through the outer groups (as a scheduler does) freezes every parameter
    for group in again.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model2.parameters()]
    (model2(torch.randn(4, 3, 32, 32)) ** 2).mean().backward()
    again.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model2.parameters()))


@muon_available
def test_one_cycle_leaves_muons_momentum_alone():
    """Sabotage: build_scheduler gives every group the cycled momentum (Muon would run at 0.9 -> 0.85, not 0.6)."""
    from fastcifar.recipe import build_model, build_optimizer, build_scheduler

    config = TrainConfig(width=4, optimizer="muon", momentum=0.9, min_momentum=0.85, muon_momentum=0.6)
    optimizer = build_optimizer(config, build_model(config, 10, CPU), CPU)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert [group["momentum"] for group in optimizer.muon.param_groups] == [0.6]
    assert all(group["momentum"] < 0.9 for group in optimizer.sgd.param_groups)  # the SGD half does cycle
