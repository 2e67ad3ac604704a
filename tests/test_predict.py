"""export.predict: classifies image files with an exported model and no torch; its input recipe matches the
graph's.

    pytest -q tests/test_predict.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.backends import make_runner
from export.onnx import int8_path
from export.predict import main as predict_main, read_image, run_batches, to_input, tta_note
from export_helpers import CLEAR_MARGIN, TIE_MARGIN, assert_same_classes_where_decided
from fastcifar.data import CLASSES
from fastcifar.errors import run_cli


REPO_ROOT = Path(__file__).resolve().parent.parent


def run_predict(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "export.predict", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def write_png(path: Path, size: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def softmax(logits: np.ndarray) -> np.ndarray:
    """The reference probabilities, computed here rather than by export.predict."""
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


@pytest.mark.slow
def test_predict_is_torch_free():
    code = "import export.predict, sys; assert 'torch' not in sys.modules, 'export.predict imports torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_a_folder_of_class_folders_stands_for_every_image_below_it(tmp_path):
    """The layout training reads (test/<class>/*.png): sabotage, a folder read without its subfolders."""
    from export.predict import expand_images

    cat, dog = (write_png(tmp_path / "test" / name, 32, seed=0) for name in ("cat/1.png", "dog/2.jpg"))
    (tmp_path / "test" / "notes.txt").write_text("not an image")
    assert expand_images([str(tmp_path / "test")]) == [str(cat), str(dog)]


@pytest.mark.slow
def test_predict_classifies_resizes_and_reports_failures(exported, tmp_path):
    """Each image's line is its top class and probability in a session of ours (the big one resized as
    read_image does; the input recipe itself is checked below against torchvision and OpenCV). Sabotage: a
    probability from another softmax, or a line paired with another image's result."""
    small = write_png(tmp_path / "small.png", 32, seed=1)
    big = write_png(tmp_path / "big.png", 64, seed=2)
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    result = run_predict(str(exported), str(small), str(junk), str(big), "--backend", "onnxruntime")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(small), str(big)]
    probs = softmax(run_batches(make_runner(exported), np.stack([read_image(small), read_image(big)])))  # ours
    for line, reference in zip(lines, probs):
        _, cls, prob = line.split("\t")
        assert float(prob) == pytest.approx(reference.max(), abs=1e-4)
        assert reference[CLASSES.index(cls)] >= reference.max() - 1e-4  # the top class, or one tied with it
    assert f"note: {big}: resized 64x64 to 32x32" in result.stderr
    assert f"error: {junk}: not an image" in result.stderr
    assert "Traceback" not in result.stderr and "inside the model" not in result.stderr  # a plain model: no TTA note


@pytest.mark.slow
def test_predict_names_the_classes_the_model_learned(exported, tiny_data, capsys):
    """The test split's folder of class folders: predict's class is our session's on every image that session
    decides by CLEAR_MARGIN, which DECIDED_SHARE of them must be (a fixture that learned nothing fails here, by
    name), and it is the folder's class far above chance. Sabotage: the shared model trained at --lr 1e-6."""
    assert run_cli(predict_main, [str(exported), str(tiny_data / "test"), "--backend", "onnxruntime"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    paths = [Path(name) for name, _, _ in lines]
    ours = run_batches(make_runner(exported), np.stack([read_image(path) for path in paths]))
    onehot = np.eye(len(CLASSES))[[CLASSES.index(cls) for _, cls, _ in lines]]
    assert_same_classes_where_decided(onehot, ours, CLEAR_MARGIN, "predict vs our session on the test split")
    assert np.mean([cls == path.parent.name for (_, cls, _), path in zip(lines, paths)]) >= 0.5  # chance: 0.1


@pytest.mark.slow
def test_predict_top_k_matches_the_session(exported, tmp_path):
    """The top 3 classes and probabilities of predict's own session are those of a session of ours, in order.
    The image is the first of a few random ones whose top four logits lie TIE_MARGIN apart in our session: a
    model trained in this run may leave any one image with two classes tied, which two sessions on other
    threads could order either way."""
    runner = make_runner(int8_path(exported))
    candidates = [write_png(tmp_path / f"{seed}.png", 32, seed=seed) for seed in range(3, 8)]
    logits = run_batches(runner, np.stack([read_image(path) for path in candidates]))
    gaps = -np.diff(np.sort(logits, axis=1)[:, ::-1][:, :4], axis=1)
    image, logits = next(((path, row) for path, row, gap in zip(candidates, logits, gaps) if gap.min() > TIE_MARGIN),
                         (None, None))
    assert image is not None, "every candidate image has a near-tie among its top four classes"
    result = run_predict(str(int8_path(exported)), str(image), "--top", "3", "--backend", "onnxruntime")
    assert result.returncode == 0, result.stderr
    fields = result.stdout.strip().split("\t")
    assert fields[0] == str(image) and len(fields) == 4
    probs = [float(f.split()[1]) for f in fields[1:]]
    assert probs == sorted(probs, reverse=True)
    reference = softmax(logits)
    best = np.argsort(-reference)[:3]
    assert [f.split()[0] for f in fields[1:]] == [CLASSES[i] for i in best]
    assert probs == pytest.approx(reference[best], abs=1e-4)


@pytest.mark.parametrize("meta", [{}, {"tta": "plain", "tta_views": '{"identity": 1.0}'}], ids=["none", "plain"])
def test_a_plain_model_gets_no_tta_note(meta):
    """A file exported without TTA (or before export.onnx recorded it); sabotage: tta_note noting any views."""
    assert tta_note(meta) is None
    tta = {"tta": "flip TTA", "tta_views": '{"identity": 0.5, "flip": 0.5}'}
    assert tta_note(tta) == ("note: flip TTA inside the model: each image's logits are the weighted mean of 2 views "
                             "(identity 0.5, flip 0.5)")


def test_documented_input_recipes_match_predict(tmp_path):
    """The module docstring promises torchvision's to_tensor and cv2.dnn.blobFromImage(img, 1/255,
    swapRB=True) produce the graph's input; check both against what export.predict feeds."""
    cv2 = pytest.importorskip("cv2")
    from torchvision.transforms.functional import to_tensor

    path = write_png(tmp_path / "a.png", 32, seed=5)
    ours = to_input(read_image(path)[None])
    np.testing.assert_allclose(cv2.dnn.blobFromImage(cv2.imread(str(path)), 1 / 255, swapRB=True), ours, atol=1e-6)
    np.testing.assert_allclose(to_tensor(Image.open(path))[None].numpy(), ours, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["missing.onnx", "junk.onnx"])
def test_predict_bad_model_is_a_usage_error(tmp_path, model):
    (tmp_path / "junk.onnx").write_bytes(b"garbage")
    image = write_png(tmp_path / "a.png", 32, seed=4)
    result = run_predict(str(tmp_path / model), str(image))
    assert result.returncode == 2
    assert result.stderr.startswith("export.predict: error: ") and result.stderr.count("\n") == 1
