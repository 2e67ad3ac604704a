"""bench/airbench_runner.py on the CPU: airbench's log and data files (a fake airbench, and the real one under
the CPU patch), its own clock, and the patch undone."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from bench_helpers import AIRBENCH_LOG, FakeAirbench, learnable_data, small_airbench, speedrun, synthetic_data

from bench import airbench_runner


def test_parse_airbench_log_reads_the_final_eval_row_and_fails_loudly_without_one():
    assert airbench_runner.parse_airbench_log(AIRBENCH_LOG) == {"val_acc": 0.9412, "tta_val_acc": 0.944,
                                                        "total_time_seconds": 3.4662,
                                                        "train_losses": [2.3047, 2.3047, 2.3047]}
    for text in ("no table here", AIRBENCH_LOG.replace("3.4662", "      ")):
        with pytest.raises(airbench_runner.AirbenchOutputError, match="does not fall back to wall time"):
            airbench_runner.parse_airbench_log(text)


def test_airbench_refuses_a_device_it_cannot_run_on_with_a_clear_message():
    with pytest.raises(speedrun.UserError, match="not on mps.*--device cpu"):
        airbench_runner.require_airbench("mps")


def test_airbench_runner_writes_its_data_files_and_reads_its_own_clock(tmp_path):
    cwd = os.getcwd()
    fake = FakeAirbench()
    out: dict = {}
    runner = airbench_runner.Airbench(fake, synthetic_data(), tmp_path, out)
    runs = [runner.run_seed(i, 5 + i) for i in range(2)]
    assert os.getcwd() == cwd and fake.calls == ["warmup", "train0", "train1"]
    assert [r["seed"] for r in runs] == [5, 6] and out["warmup_seconds"] >= 0
    # its work counted as ours: (forward + backward) x 2 epochs of 4 batches of 10 images, + 6 TTA views of 20
    conv, linear = 30 * 30 * 2 * 27, 1800 * 10
    per_image_train = 2 * (conv + linear) + 2 * (conv + 2 * linear)
    assert out["flops_per_run"] == per_image_train * 2 * 4 * 10 + 2 * (conv + linear) * 6 * 20
    assert all(r["flops"] == out["flops_per_run"] for r in runs)
    assert [r["run_seconds"] for r in runs] == [3.0, 4.0]  # its printed total_time_seconds, not our clock
    assert all(r["wall_seconds"] > 0 for r in runs)
    assert runs[0]["acc_tta"] == 0.945 and runs[0]["acc_flip_tta"] == 0.94
    stats = speedrun.method_stats(runs, 0.94, "flip+translate")
    assert stats["run_seconds"]["median"] == 3.5 and stats["at_least_threshold"]["acc_tta"]["count"] == 2


@pytest.mark.slow
def test_real_airbench_94_on_the_cpu_reports_its_own_event_clock(tmp_path, monkeypatch):
    """airbench 0.1.8's own train94/train/evaluate/print code under airbench_on_cpu, every CUDA event pair it
    times reading 250 ms: its clock must read 0.25 s x (whitening + 10 epochs + TTA eval)."""
    airbench = pytest.importorskip("airbench")

    class Event:  # every timed span reads 250 ms
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            pass

        def elapsed_time(self, end):
            return 250.0

    monkeypatch.setattr(airbench_runner, "HostClockEvent", Event)
    small_airbench(monkeypatch)
    runner = airbench_runner.Airbench(airbench, learnable_data(), tmp_path, {},
                               context=lambda: airbench_runner.airbench_on_cpu(airbench, None))
    result = runner.run_seed(0, 0)
    assert result["run_seconds"] == pytest.approx(0.25 * 12)
    assert result["logged"]["total_time_seconds"] == result["run_seconds"]
    assert result["acc_tta"] >= 0.5 and result["wall_seconds"] > 0  # it learnt the colours (chance: 0.1)


def test_real_airbench_loader_reads_our_files_on_the_cpu(tmp_path):
    airbench = pytest.importorskip("airbench")
    from fastcifar.data import CLASSES, CifarData

    rng = np.random.default_rng(1)
    data = CifarData(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10,
                     rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 10,
                     list(CLASSES), (0.5,) * 3, (0.25,) * 3, "synthetic")
    folder = airbench_runner.write_airbench_data(data, tmp_path)
    loader = airbench.CifarLoader(str(folder), train=True, batch_size=32, aug=dict(flip=True, translate=2),
                                  altflip=True, gpu="cpu")
    inputs, labels = next(iter(loader))
    assert inputs.shape == (32, 3, 32, 32) and len(loader) == 2
    assert set(labels.tolist()) <= set(range(10))
    test = airbench.CifarLoader(str(folder), train=False, batch_size=16, gpu="cpu")
    assert test.labels.tolist() == data.test_labels.tolist() and test.classes == list(CLASSES)


def _originals(airbench):
    return {"Module.cuda": torch.nn.Module.cuda, "Module.half": torch.nn.Module.half,
            "Tensor.half": torch.Tensor.half, "cuda.Event": torch.cuda.Event,
            "cuda.synchronize": torch.cuda.synchronize,
            "loader defaults": airbench.utils.CifarLoader.__init__.__defaults__,
            "LookaheadState.update": airbench.utils.LookaheadState.update}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("fail", [False, True])
def test_airbench_on_cpu_undoes_every_patch(dtype, fail):
    airbench = pytest.importorskip("airbench")
    before = _originals(airbench)
    try:
        with airbench_runner.airbench_on_cpu(airbench, dtype):
            inside = _originals(airbench)
            assert all(inside[k] is not before[k] for k in before)  # every patch is in place inside
            assert torch.ones(1).half().dtype == (dtype or torch.float32)  # airbench's fp16 is `dtype` here
            assert not torch.is_autocast_enabled("cpu")  # its fp32 whitening stays fp32
            if fail:
                raise RuntimeError("airbench failed")
    except RuntimeError:
        assert fail
    after = _originals(airbench)
    assert all(after[k] is before[k] or after[k] == before[k] for k in before), \
        [k for k in before if not (after[k] is before[k] or after[k] == before[k])]


def test_airbench_lookahead_averages_bf16_weights_as_it_does_its_fp16_ones():
    """airbench's own LookaheadState.update skips any dtype but fp16 and fp32: under the patch its bf16 weights
    (its fp16 on a GPU) move to ema + (1 - decay) x (weights - ema) like the fp16 ones do."""
    airbench = pytest.importorskip("airbench")
    with airbench_runner.airbench_on_cpu(airbench, torch.bfloat16):
        net = torch.nn.Linear(4, 2, bias=False).half()
        state = airbench.utils.LookaheadState(net)
        ema = net.weight.detach().float().clone()
        with torch.no_grad():
            net.weight.add_(1.0)
        state.update(net, decay=0.75)
    assert net.weight.dtype == torch.bfloat16
    torch.testing.assert_close(net.weight.float(), ema + 0.25, atol=2e-2, rtol=0)
