"""Each optional package, when missing, gives a one-line error naming the pyproject.toml extra that installs it
(exit 2 from a command), and the core install trains, exports and predicts without any of them. A package is
"missing" by a None in sys.modules (in this process) or a meta-path blocker (in a subprocess): nothing is
uninstalled."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastcifar.errors import UserError, run_cli

REPO = Path(__file__).resolve().parent.parent
# The extras the core must do without (pyproject.toml), by the modules they bring
NOT_CORE = ("albumentations", "cv2", "optuna", "sqlalchemy", "scipy", "openvino", "airbench", "torchinfo")


def blocked(monkeypatch, *modules: str) -> None:
    for name in modules:  # submodules too: an earlier test may have imported scipy.stats, which would stay cached
        for loaded in [key for key in sys.modules if key == name or key.startswith(name + ".")] or [name]:
            monkeypatch.setitem(sys.modules, loaded, None)  # `import loaded` raises ModuleNotFoundError


def tiny_onnx_model(path: Path) -> Path:
    """An ONNX identity on (N, 3, 32, 32) with export.onnx's class metadata: enough for export.predict."""
    import onnx
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Flatten", ["input"], ["logits"])], "g",
                              [tensor("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [tensor("logits", TensorProto.FLOAT, ["N", 3072])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"classes": '["a"]'})
    onnx.save(model, str(path))
    return path


def speedrun_module():
    return importlib.import_module("bench.speedrun")  # the repository root is on pytest's path (pyproject)


def call_tune(tmp_path):
    from fastcifar.tune import main

    return main([])


def call_compare_stats(tmp_path):
    from fastcifar.stats import paired_comparison

    return paired_comparison([0.90, 0.91, 0.92, 0.93], [0.91, 0.93, 0.92, 0.95])


def call_albumentations(tmp_path):
    from fastcifar.reference import reference_transform

    return reference_transform([0.5] * 3, [0.25] * 3, train=True)


def call_export(*flags: str):
    def call(tmp_path):
        from export.onnx import main

        return main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "model.onnx"), *flags])
    return call


def call_predict(tmp_path):
    from export.predict import main

    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    return main([str(tmp_path / "m.onnx"), str(tmp_path / "a.png"), "--backend", "onnxruntime"])


def call_airbench(tmp_path):
    return speedrun_module().require_airbench("cpu")


# (missing module, what needs it, the extra named); sabotage for each: the import left bare (a traceback)
CASES = [
    ("optuna", call_tune, "[tune]"),
    ("scipy", call_compare_stats, "fastcifar[tune]"),
    ("albumentations", call_albumentations, "fastcifar[albumentations]"),
    ("openvino", call_export("--backend", "openvino"), "fastcifar[openvino]"),
    ("onnxruntime", call_export(), "fastcifar[onnx]"),
    ("onnxruntime", call_predict, "fastcifar[onnx]"),
    ("onnx", call_predict, "fastcifar[onnx]"),
    ("airbench", call_airbench, "fastcifar[bench]"),
]


@pytest.mark.parametrize("module, call, extra", CASES, ids=[f"{m}-{c.__name__}" for m, c, _ in CASES])
def test_a_missing_optional_package_is_one_line_naming_its_extra(tmp_path, monkeypatch, capsys, module, call, extra):
    tiny_onnx_model(tmp_path / "m.onnx")  # for export.predict, made while onnx is still there
    blocked(monkeypatch, module)
    with pytest.raises(UserError) as raised:
        call(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and extra in message and module in message, message
    assert run_cli(lambda argv: call(tmp_path), [], prog="cmd") == 2  # a command's exit code
    assert capsys.readouterr().err == f"cmd: error: {message}\n"


BLOCKER = """
import importlib.abc, runpy, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv = [{module!r}, *sys.argv[1:]]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def run_without(blocked: tuple[str, ...], module: str, *argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m module argv` in a fresh interpreter in which `blocked` (and their submodules) cannot be imported."""
    code = BLOCKER.format(blocked=set(blocked), module=module)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_python_m_export_onnx_without_onnx_is_one_line_and_exit_2(tmp_path):
    """export.onnx imports onnx at the top: the command still ends in one line naming the extra, not a
    traceback. Sabotage: a bare `import onnx` at the top of export/onnx.py."""
    result = run_without(("onnx",), "export.onnx", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2, result.stderr
    assert result.stderr == "export.onnx: error: onnx is not installed: pip install 'fastcifar[onnx]'\n"


@pytest.mark.slow
def test_the_core_install_trains_exports_and_predicts_without_any_extra(tmp_path):
    """The commands a core install (`pip install -e .`) promises, with every extra's packages unimportable.
    Sabotage: a module-level import of one of them on the way (e.g. scipy in fastcifar.stats)."""
    from synthetic import write_learnable_dataset

    data = write_learnable_dataset(tmp_path / "data", train_per_class=4, test_per_class=2)
    data_dir = ["--data-dir", str(data)]
    steps = [("fastcifar.train", *data_dir, "--out-dir", str(tmp_path / "run"), "--width", "4", "--epochs", "1",
              "--batch-size", "20", "--device", "cpu", "--no-plots"),
             ("export.onnx", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx"), "--int8",
              "--calib-images", "8", *data_dir),
             ("export.predict", str(tmp_path / "m.int8.onnx"), str(data / "test"))]
    for module, *argv in steps:
        result = run_without(NOT_CORE, module, *argv)
        assert result.returncode == 0, (module, result.stderr[-2000:])
    assert "OpenVINO is not installed" in result.stderr  # predict fell back to onnxruntime and said why


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("package", ["torch", "torchvision"])
def test_torch_has_a_floor_and_no_ceiling(package):
    """A CUDA machine brings its own torch build (often newer than any we tested): pip must keep it, not
    replace it with a pinned or capped one. Sabotage: "torch>=2.5,<2.9" or "torch==2.8" in pyproject.toml."""
    spec = next(dep for dep in pyproject()["project"]["dependencies"] if re.match(r"[\w.-]+", dep)[0] == package)
    assert ">=" in spec and not re.search(r"<|==|~=", spec), spec


def test_pytest_rejects_unknown_markers():
    """A misspelt marker (@pytest.mark.slwo) would silently leave a test out of `-m "not slow"`: --strict-markers
    makes it an error. Sabotage: addopts without it."""
    assert "--strict-markers" in pyproject()["tool"]["pytest"]["ini_options"]["addopts"].split()


def test_an_installed_package_that_fails_to_import_is_one_line_naming_its_extra(tmp_path, monkeypatch):
    """albumentations present but its cv2 unloadable (a headless box without libGL): a one-line UserError that says
    so, not a traceback nor "not installed". Sabotage: `require` catching only ModuleNotFoundError."""
    real = importlib.import_module

    def broken(name: str, *args):
        if name == "albumentations":
            raise ImportError("libGL.so.1: cannot open shared object file: No such file or directory")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    expected = (r"^albumentations is installed but fails to import \(libGL\.so\.1: .*\): reinstall it with "
                r"pip install --force-reinstall 'fastcifar\[albumentations\]'$")
    with pytest.raises(UserError, match=expected):
        call_albumentations(tmp_path)
