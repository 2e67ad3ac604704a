"""fastcifar.data: every source format, the decoded cache, user errors and the command line."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastcifar import data
from fastcifar.data import CLASSES, CifarData, channel_stats, load_cifar10, main, validation_split
from fastcifar.errors import UserError, run_cli
from synthetic import learnable_images


REPO_ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = {"train": 3, "test": 2}


# --- tiny data sets, one set of pixels written in every supported format ----------------------------------

@pytest.fixture(scope="module")
def tiny() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 images, int64 labels)}, class-major so every format yields the same order."""
    rng = np.random.default_rng(0)
    out = {}
    for split, per_class in PER_CLASS.items():
        labels = np.repeat(np.arange(len(CLASSES)), per_class).astype(np.int64)
        out[split] = (rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8), labels)
    return out


def write_folders(root: Path, tiny) -> Path:
    """root/train/<class>/NNN.png, root/test/<class>/NNN.png (+ .DS_Store files to be ignored)."""
    for split, (images, labels) in tiny.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "train" / CLASSES[0] / ".DS_Store").write_bytes(b"junk")
    return root


def write_official(folder: Path, tiny) -> Path:
    """The official python layout: 5 train batches, a test batch and batches.meta.

    Written the way Python 2 pickled them (bytes keys and values), except data_batch_5, which is a
    Python 3 protocol-2 pickle as re-saved copies are.
    """
    folder.mkdir(parents=True)
    train_x, train_y = tiny["train"]
    chunks = np.array_split(np.arange(len(train_x)), 5)
    batches = {f"data_batch_{i + 1}": (train_x[idx], train_y[idx]) for i, idx in enumerate(chunks)}
    batches["test_batch"] = tiny["test"]
    for name, (x, y) in batches.items():
        planar = np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072))
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": planar,
                 b"filenames": [f"{i}.png".encode() for i in range(len(x))]}
        dumps = (lambda obj: pickle.dumps(obj, protocol=2)) if name == "data_batch_5" else py2_pickle
        (folder / name).write_bytes(dumps(batch))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 6, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta))
    return folder


def py2_pickle(obj: object) -> bytes:
    """What Python 2's cPickle.dumps(obj, 2) writes for the dicts in the official CIFAR-10 files."""
    return b"\x80\x02" + _py2(obj) + b"."


def _py2(obj: object) -> bytes:
    if isinstance(obj, bytes):  # a Python 2 str: BINSTRING
        return b"T" + struct.pack("<i", len(obj)) + obj
    if isinstance(obj, int):
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, list):
        return b"](" + b"".join(map(_py2, obj)) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 2
    dtype = b"cnumpy\ndtype\n" + _py2(b"u1") + _py2(0) + _py2(1) + b"\x87R(" + _py2(3) + _py2(b"|") + b"NNN" + \
        _py2(-1) + _py2(-1) + _py2(0) + b"tb"
    state = b"(" + _py2(1) + _py2(obj.shape[0]) + _py2(obj.shape[1]) + b"\x86" + dtype + b"\x89" + \
        _py2(obj.tobytes()) + b"tb"
    return b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2(0) + b"\x85" + _py2(b"b") + \
        b"\x87R" + state


def make_tar(out: Path, root: Path, mode: str, prefix: str | None) -> Path:
    """Tar root's children under `prefix/`, at the top when None, or as './...' when '.'."""
    with tarfile.open(out, mode) as tar:
        if prefix is None:
            for child in sorted(root.iterdir()):
                tar.add(child, arcname=child.name)
        else:
            tar.add(root, arcname=prefix)
    return out


def make_zip(out: Path, root: Path, prefix: str) -> Path:
    """Zip with directory entries and macOS junk, the way Finder writes them."""
    with zipfile.ZipFile(out, "w") as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, f"{prefix}/{path.relative_to(root).as_posix()}")
        zf.writestr(f"__MACOSX/{prefix}/train/{CLASSES[0]}/._000.png", b"resource fork")
    return out


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sources")
    official = write_official(tmp / "official" / "cifar-10-batches-py", tiny)
    folders = write_folders(tmp / "folders", tiny)
    write_folders(tmp / "nested" / "cifar10-png", tiny)
    return {
        "official-dir": official,
        "official-parent": official.parent,
        "official-tar.gz": make_tar(tmp / "cifar-10-python.tar.gz", official, "w:gz", "cifar-10-batches-py"),
        "folder-dir": folders,
        "folder-nested-dir": tmp / "nested",
        "folder-tar": make_tar(tmp / "flat.tar", folders, "w", None),
        "folder-tar.gz": make_tar(tmp / "cifar10-png.tar.gz", folders, "w:gz", "cifar10-png"),
        "folder-tgz-dot": make_tar(tmp / "dot.tgz", folders, "w:gz", "."),
        "folder-zip": make_zip(tmp / "cifar10-png.zip", folders, "cifar10-png"),
        # told apart by their magic numbers: bz2 and xz as well as gzip
        "folder-tar.bz2": make_tar(tmp / "cifar10-png.tar.bz2", folders, "w:bz2", "cifar10-png"),
        "folder-txz": make_tar(tmp / "cifar10-png.txz", folders, "w:xz", "cifar10-png"),
    }


FORMATS = ["official-dir", "official-parent", "official-tar.gz", "folder-dir", "folder-nested-dir", "folder-tar",
           "folder-tar.gz", "folder-tgz-dot", "folder-zip", "folder-tar.bz2", "folder-txz"]


def assert_same(a: CifarData, b: CifarData) -> None:
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.classes, a.mean, a.std) == (b.classes, b.mean, b.std)


# --- formats and statistics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_arrays(fmt, sources, tiny, tmp_path):
    d = load_cifar10(sources[fmt], cache_dir=tmp_path, use_cache=False)
    for split in ("train", "test"):
        images, labels = getattr(d, f"{split}_images"), getattr(d, f"{split}_labels")
        assert images.dtype == np.uint8 and images.flags.c_contiguous and labels.dtype == np.int64
        np.testing.assert_array_equal(images, tiny[split][0])
        np.testing.assert_array_equal(labels, tiny[split][1])
    assert d.classes == list(CLASSES)
    assert d.mean == channel_stats(tiny["train"][0])[0]
    assert str(sources[fmt]) in d.source
    assert not (tmp_path / "decoded").exists()


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_channel_stats_match_numpy(chunk):
    images = np.random.default_rng(1).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    images[:10] = 255  # skewed values stress the sum-of-squares formula
    mean, std = channel_stats(images, chunk=chunk)
    ref = images.astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)) / 255, rtol=0, atol=1e-6)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)) / 255, rtol=0, atol=1e-6)


def test_non_rgb_images_are_converted(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    images = {"gray.png": Image.fromarray(pixels[..., 0], "L"), "rgba.png": Image.fromarray(pixels, "RGBA"),
              "palette.png": Image.fromarray(pixels[..., :3]).convert("P"),
              "photo.jpg": Image.fromarray(pixels[..., :3])}
    for split in ("train", "test"):
        (tmp_path / split / "thing").mkdir(parents=True)
        for name, image in images.items():
            image.save(tmp_path / split / "thing" / name)
    d = load_cifar10(tmp_path, use_cache=False)
    for i, name in enumerate(sorted(images)):
        expected = np.asarray(Image.open(tmp_path / "train" / "thing" / name).convert("RGB"))
        np.testing.assert_array_equal(d.train_images[i], expected, err_msg=name)
    assert d.classes == ["thing"] and d.train_images.shape == (4, 32, 32, 3)


# --- decoded cache -------------------------------------------------------------------------------------------

def forbid_decoding(monkeypatch) -> None:
    def fail(path):
        raise AssertionError(f"decoded {path} although a valid cache exists")
    monkeypatch.setattr(data, "_decode_source", fail)


def count_decodes(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = data._decode_source
    monkeypatch.setattr(data, "_decode_source", lambda path: calls.append(path) or real(path))
    return calls


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "decoded").glob("*.npz"))


@pytest.mark.parametrize("fmt", ["folder-tar.gz", "folder-dir"])
def test_second_load_comes_from_cache(fmt, sources, tmp_path, monkeypatch):
    first = load_cifar10(sources[fmt], cache_dir=tmp_path)
    assert len(cache_files(tmp_path)) == 1
    forbid_decoding(monkeypatch)
    second = load_cifar10(sources[fmt], cache_dir=tmp_path)
    assert_same(first, second)
    assert second.source == first.source and second.train_images.flags.c_contiguous


def test_cache_dir_defaults_to_fastcifar_home(sources, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCIFAR_HOME", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    load_cifar10(sources["folder-zip"])
    assert len(cache_files(tmp_path)) == 1


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _rewrite(f: Path, **changes) -> None:
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    for k, v in changes.items():
        if v is None:
            del arrays[k]
    with open(f, "wb") as out:
        np.savez(out, **arrays)


CORRUPTIONS = {
    "truncated": _truncate,
    "garbage": lambda f: f.write_bytes(b"not a zip file at all"),
    "empty": lambda f: f.write_bytes(b""),
    "foreign key": lambda f: _rewrite(f, key=np.array("0" * 40)),
    "missing array": lambda f: _rewrite(f, test_labels=None),
    "wrong dtype": lambda f: _rewrite(f, train_labels=np.zeros(30, np.int32)),
    "wrong shape": lambda f: _rewrite(f, train_images=np.zeros((30, 32, 32), np.uint8)),
    "label out of range": lambda f: _rewrite(f, test_labels=np.full(20, 10, np.int64)),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_damaged_cache_is_rebuilt(corruption, sources, tmp_path, monkeypatch):
    first = load_cifar10(sources["folder-tar"], cache_dir=tmp_path)
    [cache_file] = cache_files(tmp_path)
    CORRUPTIONS[corruption](cache_file)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_cifar10(sources["folder-tar"], cache_dir=tmp_path)
    assert_same(first, rebuilt)
    forbid_decoding(monkeypatch)
    assert_same(first, load_cifar10(sources["folder-tar"], cache_dir=tmp_path))


def test_changed_archive_invalidates_cache(sources, tmp_path, monkeypatch):
    archive = tmp_path / "copy.tar"
    archive.write_bytes(sources["folder-tar"].read_bytes())
    cache = tmp_path / "cache"
    calls = count_decodes(monkeypatch)
    load_cifar10(archive, cache_dir=cache)
    load_cifar10(archive, cache_dir=cache)
    assert len(calls) == 1
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    load_cifar10(archive, cache_dir=cache)
    assert len(calls) == 2 and len(cache_files(cache)) == 2


def test_edited_image_folder_invalidates_cache(tiny, tmp_path):
    root = write_folders(tmp_path / "tree", tiny)
    cache = tmp_path / "cache"
    load_cifar10(root, cache_dir=cache)
    first_image = root / "train" / CLASSES[0] / "000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(first_image)
    os.utime(first_image, ns=(0, 0))  # a different mtime even on coarse-timestamp file systems
    assert not load_cifar10(root, cache_dir=cache).train_images[0].any()


def test_the_cache_key_is_the_sources_path_size_and_mtime(sources, tmp_path, monkeypatch):
    """Sabotage: the size or the path left out of the key. Another archive with the same mtime (cp -p, a
    restored backup) must decode again, and an equal copy at another path must not read as the first one."""
    calls = count_decodes(monkeypatch)
    cache = tmp_path / "cache"
    first, second = (tmp_path / name / "data.tar" for name in ("a", "b"))
    for copy in (first, second):
        copy.parent.mkdir()
        copy.write_bytes(sources["folder-tar"].read_bytes())
        os.utime(copy, ns=(0, 10**18))
    assert str(first) in load_cifar10(first, cache_dir=cache).source
    assert str(second) in load_cifar10(second, cache_dir=cache).source and len(calls) == 2
    first.write_bytes(sources["folder-tar.gz"].read_bytes())  # the same images, gzipped: another size
    os.utime(first, ns=(0, 10**18))
    load_cifar10(first, cache_dir=cache)
    assert len(calls) == 3


def test_symlinked_folders_are_followed_and_junk_is_skipped(tiny, tmp_path):
    """Sabotage: os.walk without followlinks (a train/ or test/ linked from elsewhere reads as empty); Thumbs.db,
    desktop.ini or __MACOSX/ no longer junk (an image below __MACOSX/ would make a second train/test tree)."""
    real = write_folders(tmp_path / "real", tiny)
    root = tmp_path / "linked"
    root.mkdir()
    for split in ("train", "test"):
        (root / split).symlink_to(real / split, target_is_directory=True)
    (real / "train" / CLASSES[1] / "Thumbs.db").write_bytes(b"junk")
    (real / "test" / CLASSES[2] / "desktop.ini").write_bytes(b"junk")
    stray = root / "__MACOSX" / "train" / CLASSES[0] / "000.png"
    stray.parent.mkdir(parents=True)
    stray.write_bytes((real / "train" / CLASSES[0] / "000.png").read_bytes())
    d = load_cifar10(root, use_cache=False)
    np.testing.assert_array_equal(d.train_images, tiny["train"][0])
    np.testing.assert_array_equal(d.test_labels, tiny["test"][1])


def test_the_walk_stays_off_folders_that_cannot_hold_the_data(tiny, tmp_path, monkeypatch):
    """Sabotage: no pruning in _scan_dir. Below a top-level folder that is not train/ or test/ nothing can be read,
    and followlinks=True would walk a link loop there about 40 levels deep (till ELOOP)."""
    root = write_folders(tmp_path / "tree", tiny).resolve()  # as load_cifar10 walks it
    (root / "notes").mkdir()
    (root / "notes" / "loop").symlink_to(root, target_is_directory=True)
    scanned = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": scanned.append(Path(path)) or real_scandir(path))
    d = load_cifar10(root, use_cache=False)
    np.testing.assert_array_equal(d.train_images, tiny["train"][0])
    assert root / "notes" in scanned and not [p for p in scanned if (root / "notes") in p.parents]


def test_no_cache_writes_nothing(sources, tmp_path, monkeypatch):
    load_cifar10(sources["folder-tar"], cache_dir=tmp_path, use_cache=False)
    assert not any(tmp_path.iterdir())


def test_unwritable_cache_only_warns(sources, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.warns(UserWarning, match="could not write decoded cache"):
        d = load_cifar10(sources["folder-tar"], cache_dir=not_a_dir)
    assert len(d.train_labels) == 30


# --- user errors ----------------------------------------------------------------------------------------------

def _folder_with(tmp: Path, tiny, rel: str, content: bytes | Image.Image) -> Path:
    root = write_folders(tmp / "tree", tiny)
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    content.save(target) if isinstance(content, Image.Image) else target.write_bytes(content)
    return root


def _official_with(tmp: Path, tiny, name: str, content: object) -> Path:
    folder = write_official(tmp / "cifar-10-batches-py", tiny)
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
    return folder


def _official_without(tmp: Path, tiny, *names: str) -> Path:
    folder = write_official(tmp / "cifar-10-batches-py", tiny)
    for name in names:
        (folder / name).unlink()
    return folder


def _file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _damaged(src: Path, out: Path, keep: float) -> Path:
    out.write_bytes(src.read_bytes()[: int(src.stat().st_size * keep)])
    return out


def _flipped(src: Path, out: Path) -> Path:
    raw = bytearray(src.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    out.write_bytes(bytes(raw))
    return out


def _tar_broken_at_member(src: Path, out: Path, how: str) -> Path:
    """Cut or zero a plain tar at its last member's header: damage tarfile alone reads as a clean end."""
    with tarfile.open(src) as tar:
        offset = tar.getmembers()[-1].offset
    raw = src.read_bytes()
    broken = raw[:offset] if how == "cut" else raw[:offset] + bytes(512) + raw[offset + 512:]
    out.write_bytes(gzip.compress(broken) if out.name.endswith(".gz") else broken)
    return out


def _zip_of(out: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return out


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _dangling_link(tmp: Path, tiny) -> Path:
    root = write_folders(tmp / "tree", tiny)
    (root / "train" / "cat" / "gone.png").symlink_to(tmp / "nowhere.png")
    return root


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    return pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)


# name -> (build(tmp, tiny, sources) -> path, text(s) the message must contain)
BAD_INPUTS = {
    "missing path": (lambda t, d, s: t / "nowhere", "nowhere"),
    "unknown file type": (lambda t, d, s: _file(t / "data.csv", b"a,b"), "data.csv"),
    "empty folder": (lambda t, d, s: (t / "empty").mkdir() or t / "empty", "empty"),
    "no split in archive": (lambda t, d, s: _zip_of(t / "flat.zip", {"pics/a.png": b"x"}), "flat.zip"),
    "only train": (lambda t, d, s: make_tar(t / "half.tar", s["folder-dir"] / "train", "w", "train"), "half.tar"),
    "test class not in train": (lambda t, d, s: _folder_with(t, d, "test/zebra/0.png", Image.new("RGB", (32, 32))),
                                "zebra"),
    "wrong image size": (lambda t, d, s: _folder_with(t, d, "train/cat/big.png", Image.new("RGB", (33, 32))),
                         ("big.png", "33x32")),
    "not an image": (lambda t, d, s: _folder_with(t, d, "train/cat/notes.txt", b"hello"), "notes.txt"),
    "not an image in archive": (
        lambda t, d, s: make_tar(t / "x.tar.gz", _folder_with(t, d, "test/dog/notes.txt", b"hi"), "w:gz", "root"),
        "root/test/dog/notes.txt"),
    "unreadable file": (lambda t, d, s: _dangling_link(t, d), ("cannot read", "gone.png")),
    "truncated image": (lambda t, d, s: _folder_with(t, d, "train/cat/cut.png", _png_bytes()[:200]), "cut.png"),
    "several trees": (lambda t, d, s: _folder_with(t, d, "extra/train/cat/0.png", Image.new("RGB", (32, 32))),
                      "extra"),
    "truncated tar.gz": (lambda t, d, s: _damaged(s["folder-tar.gz"], t / "cut.tar.gz", 0.5), "cut.tar.gz"),
    "corrupt tar.gz": (lambda t, d, s: _flipped(s["folder-tar.gz"], t / "flip.tar.gz"), "flip.tar.gz"),
    "corrupt txz": (lambda t, d, s: _flipped(s["folder-txz"], t / "flip.txz"), "flip.txz"),  # lzma's own error
    "garbage tgz": (lambda t, d, s: _file(t / "junk.tgz", b"\x1f\x8bjunk" * 100), "junk.tgz"),
    "tar cut at a member": (lambda t, d, s: _tar_broken_at_member(s["folder-tar"], t / "cut.tar", "cut"),
                            "cut.tar"),
    "tar header zeroed": (lambda t, d, s: _tar_broken_at_member(s["folder-tar"], t / "zero.tar", "zero"),
                          "zero.tar"),
    "tar.gz header zeroed": (lambda t, d, s: _tar_broken_at_member(s["folder-tar"], t / "zero.tar.gz", "zero"),
                             "zero.tar.gz"),
    "truncated zip": (lambda t, d, s: _damaged(s["folder-zip"], t / "cut.zip", 0.6), "cut.zip"),
    "corrupt zip": (lambda t, d, s: _flipped(s["folder-zip"], t / "flip.zip"), "flip.zip"),
    "truncated official tar.gz": (lambda t, d, s: _damaged(s["official-tar.gz"], t / "cifar-10-python.tar.gz", 0.7),
                                  "cifar-10-python.tar.gz"),
    "garbage batch": (lambda t, d, s: _official_with(t, d, "data_batch_3", b"\x80\x02garbage"), "data_batch_3"),
    "batch without data": (lambda t, d, s: _official_with(t, d, "data_batch_2", {b"labels": [1]}), "data_batch_2"),
    "batch wrong shape": (lambda t, d, s: _official_with(
        t, d, "test_batch", {b"data": np.zeros((20, 3000), np.uint8), b"labels": [0] * 20}),
        ("test_batch): data is uint8 (20, 3000), expected uint8 (N, 3072); re-download", "corrupt CIFAR-10 batch (")),
    "batch of floats": (lambda t, d, s: _official_with(
        t, d, "data_batch_4", {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
        "data_batch_4): data is float32 (2, 3072), expected uint8 (N, 3072); re-download"),
    "batch of twice the columns": (lambda t, d, s: _official_with(  # reshapes into 4 images: only the check stops it
        t, d, "test_batch", {b"data": np.zeros((2, 6144), np.uint8), b"labels": [0, 1]}),
        "test_batch): data is uint8 (2, 6144), expected uint8 (N, 3072); re-download"),
    "batch of one row": (lambda t, d, s: _official_with(
        t, d, "test_batch", {b"data": np.zeros(3072, np.uint8), b"labels": [0]}),
        "test_batch): data is uint8 (3072,), expected uint8 (N, 3072); re-download"),
    "batch bad labels": (lambda t, d, s: _official_with(
        t, d, "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "test_batch"),
    "batch not a dict": (lambda t, d, s: _official_with(t, d, "data_batch_5", [1, 2]), "data_batch_5"),
    "batch runs code": (lambda t, d, s: _official_with(t, d, "data_batch_1", _evil_pickle(t / "pwned")),
                        "data_batch_1"),
    "meta without names": (lambda t, d, s: _official_with(t, d, "batches.meta", {b"x": 1}), "batches.meta"),
    "missing batch": (lambda t, d, s: _official_with(t, d, "test_batch", None), "test_batch"),
    "missing files": (lambda t, d, s: _official_without(t, d, "data_batch_2", "test_batch", "batches.meta"),
                      "missing data_batch_2, test_batch, batches.meta; delete it"),
}


def test_a_file_that_cannot_be_read_is_named_without_the_cache_too(tiny, tmp_path):
    with pytest.raises(UserError, match="cannot read .*gone.png"):
        load_cifar10(_dangling_link(tmp_path, tiny), use_cache=False)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_one_line_user_error(case, tiny, sources, tmp_path, capsys):
    build, expected = BAD_INPUTS[case]
    expected = (expected,) if isinstance(expected, str) else expected
    path = build(tmp_path, tiny, sources)
    with pytest.raises(UserError) as info:
        load_cifar10(path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert all(text in message for text in expected) and "\n" not in message
    capsys.readouterr()
    assert run_cli(main, ["--data-dir", str(path), "--cache-dir", str(tmp_path / "cache")]) == 2
    out, err = capsys.readouterr()
    assert err == f"fastcifar: error: {message}\n"
    assert not (tmp_path / "cache" / "decoded").exists() or not cache_files(tmp_path / "cache")
    assert not (tmp_path / "pwned").exists()


def test_debug_flag_shows_the_exception(tmp_path):
    with pytest.raises(UserError):
        run_cli(main, ["--data-dir", str(tmp_path / "nowhere"), "--debug"])


@pytest.mark.slow
def test_module_entry_point_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastcifar.data", "--data-dir", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                          env={**os.environ, "FASTCIFAR_HOME": str(tmp_path)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("fastcifar.data: error: ") and proc.stderr.count("\n") == 1


# --- no data_dir: cache directory, download, offline ----------------------------------------------------------

def test_offline_without_data_says_how_to_point_at_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTCIFAR_HOME", str(tmp_path))
    monkeypatch.setattr(data, "_is_online", lambda: False)
    with pytest.raises(UserError, match="and this machine is offline: pass --data-dir") as info:
        load_cifar10()
    assert str(tmp_path) in str(info.value)
    assert run_cli(main, []) == 2
    assert capsys.readouterr().err.startswith("fastcifar: error: ")
    monkeypatch.setattr(data, "_is_online", lambda: pytest.fail("probed the network with downloading off"))
    with pytest.raises(UserError, match="and downloading is off: pass --data-dir"):
        load_cifar10(download=False)


def test_online_probe_answers_by_the_connection_and_gives_up_on_a_stall(monkeypatch):
    """A refused connection is offline, an open one online, and a stalled one (a DNS lookup that hangs)
    is offline after the timeout instead of blocking the run."""
    import threading

    class Open:
        def close(self) -> None:
            pass

    def refused(address, timeout):
        raise ConnectionRefusedError(address)

    release = threading.Event()
    monkeypatch.setattr(data.socket, "create_connection", refused)
    assert data._is_online() is False
    monkeypatch.setattr(data.socket, "create_connection", lambda address, timeout: Open())
    assert data._is_online() is True
    monkeypatch.setattr(data.socket, "create_connection", lambda address, timeout: release.wait(30) and Open())
    start = time.perf_counter()
    try:
        assert data._is_online(timeout=0.2) is False
        assert time.perf_counter() - start < 1.5
    finally:
        release.set()


def test_official_files_in_cache_dir_need_no_network(tiny, tmp_path, monkeypatch):
    write_official(tmp_path / "cifar-10-batches-py", tiny)
    monkeypatch.setattr(data, "_is_online", lambda: pytest.fail("probed the network"))
    d = load_cifar10(cache_dir=tmp_path)
    np.testing.assert_array_equal(d.test_images, tiny["test"][0])


def _fake_torchvision(monkeypatch, download) -> list[dict]:
    calls: list[dict] = []

    def download_and_extract_archive(url, download_root, md5=None, **kwargs):
        calls.append({"url": url, "root": download_root, "md5": md5})
        download(Path(download_root))

    module = types.ModuleType("torchvision.datasets.utils")
    module.download_and_extract_archive = download_and_extract_archive
    monkeypatch.setitem(sys.modules, "torchvision.datasets.utils", module)
    return calls


def test_download_into_cache_dir(tiny, tmp_path, monkeypatch):
    calls = _fake_torchvision(monkeypatch, lambda root: write_official(root / "cifar-10-batches-py", tiny))
    d = load_cifar10(download=True, cache_dir=tmp_path)
    assert calls == [{"url": data.URL, "root": str(tmp_path), "md5": "c58f30108f718f92721af3b95e74349a"}]
    np.testing.assert_array_equal(d.train_images, tiny["train"][0])
    load_cifar10(cache_dir=tmp_path)  # found this time: no second download
    assert len(calls) == 1


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    def fail(root):
        raise RuntimeError("File not found or corrupted.")
    _fake_torchvision(monkeypatch, fail)
    with pytest.raises(UserError, match="--data-dir"):
        load_cifar10(download=True, cache_dir=tmp_path)


# --- command line ---------------------------------------------------------------------------------------------

def test_cli_prints_counts_and_stats(sources, tiny, tmp_path, capsys):
    assert run_cli(main, ["--data-dir", str(sources["folder-zip"]), "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("source: ") and str(sources["folder-zip"]) in out
    lines = out.splitlines()
    for cls in CLASSES:
        assert any(line.split() == [cls, "3", "2"] for line in lines), cls
    assert any(line.split() == ["total", "30", "20"] for line in lines)
    mean = channel_stats(tiny["train"][0])[0]
    assert f"train mean: {mean[0]:.5f} {mean[1]:.5f} {mean[2]:.5f}" in out and "train std: " in out


def test_cli_augment_grid_lives_with_the_plots(sources, tmp_path, monkeypatch, capsys):
    """The grid is drawn by fastcifar.plots' command line from the loaded data; data.py never imports plots
    (data flows one way: data -> augment -> ... -> plots)."""
    import fastcifar.plots as plots

    calls = []
    monkeypatch.setattr(plots, "save_augment_grid", lambda d, path, seed: calls.append((d, path, seed)))
    grid = str(tmp_path / "grid.png")
    assert run_cli(plots.main, ["--data-dir", str(sources["folder-dir"]), "--augment-grid", grid, "--seed", "5"]) == 0
    [(d, path, seed)] = calls
    assert isinstance(d, CifarData) and path == grid and seed == 5
    assert "augmentation grid: " in capsys.readouterr().out


def test_data_module_does_not_import_plots(sources, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastcifar.plots", None)  # any import of it would raise
    assert run_cli(main, ["--data-dir", str(sources["folder-tar"]), "--no-cache"]) == 0
    source = (REPO_ROOT / "fastcifar" / "data.py").read_text()
    assert "plots" not in source


# --- the real data set ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_cifar10(real_cifar):
    d = real_cifar
    assert d.train_images.shape == (50000, 32, 32, 3) and d.test_images.shape == (10000, 32, 32, 3)
    assert d.train_images.dtype == np.uint8 and d.train_images.flags.c_contiguous
    assert d.classes == list(CLASSES)
    assert np.bincount(d.train_labels).tolist() == [5000] * 10
    assert np.bincount(d.test_labels).tolist() == [1000] * 10
    np.testing.assert_allclose(d.mean, (0.4914, 0.4822, 0.4465), atol=1e-3)
    np.testing.assert_allclose(d.std, (0.2470, 0.2435, 0.2616), atol=1e-3)
    sample = d.train_images[::10].astype(np.float64)
    np.testing.assert_allclose(channel_stats(d.train_images[::10])[0], sample.mean(axis=(0, 1, 2)) / 255,
                               atol=1e-6)


def uneven_data() -> CifarData:
    """Classes of different sizes (30, 31, ..., 39 images), so stratification has remainders to place."""
    images, labels = learnable_images(39, seed=3)
    keep = np.concatenate([np.flatnonzero(labels == c)[:30 + c] for c in range(10)])
    test_x, test_y = learnable_images(2, seed=4)
    mean, std = channel_stats(images[keep])
    return CifarData(images[keep], labels[keep], test_x, test_y, list(CLASSES), mean, std, "synthetic")


def test_split_is_stratified_disjoint_and_complete():
    data = uneven_data()
    split = validation_split(data, 69, seed=0)
    counts = np.bincount(data.train_labels)
    held = np.bincount(split.test_labels, minlength=10)
    assert held.sum() == 69 and len(split.train_labels) == len(data.train_labels) - 69
    assert np.all(np.abs(held - 69 * counts / counts.sum()) < 1)  # each class its share, rounded
    # every training image is in exactly one of the two parts (images are unique: noise)
    rows = lambda x: {img.tobytes() for img in x}  # noqa: E731
    assert rows(split.train_images) | rows(split.test_images) == rows(data.train_images)
    assert not rows(split.train_images) & rows(split.test_images)
    assert not rows(split.test_images) & rows(data.test_images)  # the test set is dropped
    assert "validation split: 69" in split.source and "test set unused" in split.source


def test_split_is_fixed_by_its_seed_and_stats_come_from_the_remaining_images():
    data = uneven_data()
    a, b, c = validation_split(data, 50, 0), validation_split(data, 50, 0), validation_split(data, 50, 1)
    assert np.array_equal(a.test_images, b.test_images)
    assert not np.array_equal(a.test_images, c.test_images)
    assert a.mean == pytest.approx(channel_stats(a.train_images)[0])
    assert a.std == pytest.approx(channel_stats(a.train_images)[1])
    assert a.mean != pytest.approx(data.mean, abs=1e-9)


@pytest.mark.parametrize("size", [0, 345, 1000])
def test_split_size_out_of_range_is_a_user_error(size):
    with pytest.raises(UserError, match=r"invalid --val-split \(\d+\).*lower --val-split"):
        validation_split(uneven_data(), size)
