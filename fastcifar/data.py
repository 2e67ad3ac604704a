"""CIFAR-10 loading: the official python batches or an image-folder tree, as a directory or an archive.

    python -m fastcifar.data --data-dir ../shared/data/cifar10-png.tar.gz

The sources, told apart by what the path is, are listed in docs/training.md (Data). The decoded arrays are
cached as `<cache>/decoded/<key>.npz`, keyed by the source's path and the size and mtime of every file read,
so every load after the first takes well under a second.
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import pickle
import socket
import sys
import tarfile
import threading
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastcifar.atomic import atomic_path
from fastcifar.errors import UserError, first_line, run_cli

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
OFFICIAL_DIR = "cifar-10-batches-py"
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
FORMAT_VERSION = 1  # bump when the decoded cache layout or decoding changes

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_OFFICIAL_FILES = (*_TRAIN_BATCHES, "test_batch", "batches.meta")
_SPLITS = ("train", "test")
_JUNK = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_SIZE = 32
_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
_CACHE_KEYS = frozenset({*_CACHE_ARRAYS, "classes", "mean", "std", "key", "source"})

Members = dict[str, bytes]  # posix path inside the source -> its bytes


@dataclass
class CifarData:
    train_images: np.ndarray  # uint8 (N, 32, 32, 3), C-contiguous
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray  # uint8 (M, 32, 32, 3), C-contiguous
    test_labels: np.ndarray  # int64 (M,)
    classes: list[str]
    mean: tuple[float, float, float]  # per channel, training split, [0, 1] pixel units
    std: tuple[float, float, float]  # population std (ddof=0), training split, [0, 1] pixel units
    source: str


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTCIFAR_HOME") or "~/.cache/fastcifar").expanduser()


def channel_stats(images: np.ndarray, chunk: int = 1024
                  ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and population std of uint8 (N, H, W, 3) images, in [0, 1] units.

    Pixel sums and sums of squares are integers below 2**53, so float64 accumulates them exactly; a
    chunk at a time keeps the float64 copy small.
    """
    total, total_sq = np.zeros(3), np.zeros(3)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].reshape(-1, 3)
        planar = part.T.astype(np.float64, order="C")  # channel-major: the reductions run over contiguous memory
        total += planar.sum(axis=1)
        total_sq += np.square(planar, out=planar).sum(axis=1)  # not BLAS dot: its threads crawl on busy CPUs
    n = images.size // 3
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool | None = None,
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> CifarData:
    """Load CIFAR-10 from `data_dir` (a source of docs/training.md, Data), or from / into the cache when None;
    `download=None` downloads only when no copy is found and the machine is online."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = _source_path(data_dir) if data_dir is not None else _find_or_download(cache, download)
    try:  # a file of a tree can fail at its stat for the cache key or at its read to decode it
        if not use_cache:
            return _decode_source(path)
        key = _cache_key(path)
        cache_file = cache / "decoded" / f"{key}.npz"
        data = _read_cache(cache_file, key)
        if data is None:
            data = _decode_source(path)
            _write_cache(cache_file, key, data)
    except OSError as e:  # the archive reader and the cache's writer handle their own
        raise UserError(f"cannot read {e.filename or path} ({first_line(e)}): check that it exists and is readable") from e
    return data


def validation_split(data: CifarData, size: int, seed: int = 0) -> CifarData:
    """`data` with `size` training images held out as the evaluation set (in the test arrays), stratified:
    each class gives `size` x its share (largest remainders round), picked by a permutation seeded with `seed`.
    Mean and std come from the remaining training images, so nothing about the held-out ones reaches training;
    the real test set is dropped."""
    num_train = len(data.train_labels)
    if not 0 < size < num_train:
        raise UserError(f"invalid --val-split ({size}): must be between 1 and {num_train - 1}, fewer than the "
                        f"{num_train} training images; lower --val-split")
    counts = np.bincount(data.train_labels, minlength=len(data.classes))
    exact = size * counts / num_train
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(-(exact - quota), kind="stable")[:size - int(quota.sum())]] += 1
    order = np.random.default_rng(seed).permutation(num_train)
    held = np.zeros(num_train, dtype=bool)
    for c, n in enumerate(quota):
        held[order[data.train_labels[order] == c][:n]] = True
    train_x = data.train_images[~held]  # boolean indexing copies: both parts are C-contiguous
    return CifarData(train_x, data.train_labels[~held], data.train_images[held], data.train_labels[held],
                     list(data.classes), *channel_stats(train_x),
                     f"{data.source}, validation split: {size} training images held out (split seed {seed}), "
                     "test set unused")


# --- locating the source ---------------------------------------------------------------------------------

def _source_path(data_dir: str | os.PathLike) -> Path:
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"data path not found ({path}): pass --data-dir pointing at an image-folder tree or "
                        f"archive, or at the official {OFFICIAL_DIR} files")
    return path.resolve()


def _find_or_download(cache: Path, download: bool | None) -> Path:
    official = cache / OFFICIAL_DIR
    if official.exists():
        return official.resolve()
    if not (_is_online() if download is None else download):
        why = "this machine is offline" if download is None else "downloading is off"
        raise UserError(f"no CIFAR-10 found at {official} and {why}: pass --data-dir PATH (an image-folder "
                        f"tree or archive, or the official {OFFICIAL_DIR} files) or set FASTCIFAR_HOME")
    from torchvision.datasets.utils import download_and_extract_archive

    cache.mkdir(parents=True, exist_ok=True)
    try:
        download_and_extract_archive(URL, download_root=str(cache), md5=MD5)
    except (OSError, RuntimeError, tarfile.TarError, EOFError) as e:
        raise UserError(f"could not download CIFAR-10 from {URL} into {cache} ({first_line(e)}): check the "
                        f"connection, or pass --data-dir PATH to a local copy") from e
    return official.resolve()


def _is_online(host: str = "www.cs.toronto.edu", port: int = 443, timeout: float = 2.0) -> bool:
    # A thread bounds the whole probe: a stalled DNS lookup ignores the socket timeout.
    reachable = threading.Event()

    def probe() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=timeout).close()
            reachable.set()

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)  # returns as soon as the probe ends: a refused connection is offline at once
    return reachable.is_set()


# --- decoded cache ---------------------------------------------------------------------------------------

def _cache_key(path: Path) -> str:
    # A directory's own mtime misses edits inside class folders, so a tree fingerprints every file read.
    files = sorted(_scan_dir(path).items()) if path.is_dir() else [("", path)]
    stats = [(rel, st.st_size, st.st_mtime_ns) for rel, st in ((rel, f.stat()) for rel, f in files)]
    return hashlib.sha1(repr((str(path), stats, FORMAT_VERSION)).encode()).hexdigest()


def _read_cache(cache_file: Path, key: str) -> CifarData | None:
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if set(z.files) != _CACHE_KEYS or str(z["key"]) != key:
                raise ValueError("stale or foreign cache file")
            data = CifarData(*(z[name] for name in _CACHE_ARRAYS), classes=z["classes"].tolist(),
                             mean=tuple(z["mean"].tolist()), std=tuple(z["std"].tolist()), source=str(z["source"]))
        for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (_SIZE, _SIZE, 3):
                raise ValueError(f"bad images {images.dtype} {images.shape}")
            if labels.dtype != np.int64 or labels.shape != (len(images),):
                raise ValueError(f"bad labels {labels.dtype} {labels.shape}")
            if len(labels) and not 0 <= labels.min() <= labels.max() < len(data.classes):
                raise ValueError("labels out of range")
        return data
    except Exception as e:  # any damage, whatever numpy or zipfile raises, means: decode again
        warnings.warn(f"ignoring unusable decoded cache {cache_file} ({first_line(e)}); rebuilding it", stacklevel=3)
        return None


def _write_cache(cache_file: Path, key: str, data: CifarData) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, **vars(data), key=np.array(key))
    except OSError as e:  # a read-only or full cache disk should not stop training
        warnings.warn(f"could not write decoded cache {cache_file} ({first_line(e)})", stacklevel=3)


# --- reading members of a directory or an archive --------------------------------------------------------

def _decode_source(path: Path) -> CifarData:
    members = _list_members(path)
    if any(_is_official(_parts(rel)) for rel in members):
        return _decode_official(members, path)
    return _decode_folders(members, path)


def _list_members(path: Path) -> Members:
    if path.is_dir():
        return {rel: file.read_bytes() for rel, file in _scan_dir(path).items()}
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied; fix its permissions or copy it")
    name = path.name.lower()
    is_zip = name.endswith(".zip")
    if not is_zip and not name.endswith((".tar", ".tgz", ".tbz2", ".txz")) and ".tar." not in name:
        raise UserError(f"unsupported data file type ({path}): pass a directory, or a .tar, .tar.gz/.tgz or .zip "
                        f"archive of an image-folder tree, or the official {OFFICIAL_ARCHIVE}")
    try:
        if is_zip:
            with zipfile.ZipFile(path) as zf:
                return {"/".join(parts): zf.read(info) for info in zf.infolist()
                        if not info.is_dir() and _wanted(parts := _parts(info.filename))}
        with _open_tar_bytes(path) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            members = {"/".join(parts): tar.extractfile(info).read() for info in tar
                       if info.isfile() and _wanted(parts := _parts(info.name))}
            _check_tar_end(stream, tar.offset)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise UserError(f"truncated or corrupt archive ({path}): {first_line(e)}; re-download or re-create it") from e
    return members


def _parts(name: str) -> tuple[str, ...]:
    """'./a//b/c' -> ('a', 'b', 'c'); str.split because pathlib is the bottleneck over 60,000 names."""
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _ignored(part: str) -> bool:
    return part.startswith(".") or part in _JUNK


def _is_official(parts: tuple[str, ...]) -> bool:
    """[cifar-10-batches-py/]data_batch_N and friends."""
    return len(parts) <= 2 and parts[-1] in _OFFICIAL_FILES


def _wanted(parts: tuple[str, ...]) -> bool:
    """An official file, or an image at [root/]train|test/<class>/<file>; nothing hidden or junk."""
    if not parts or any(_ignored(p) for p in parts):
        return False
    return _is_official(parts) or (len(parts) in (3, 4) and parts[-3] in _SPLITS)


def _may_hold_wanted(parts: tuple[str, ...]) -> bool:
    """Whether a directory at `parts` can contain wanted files; keeps the walk off unrelated trees."""
    n = len(parts)
    return n <= 1 or (n == 2 and (parts[0] in _SPLITS or parts[1] in _SPLITS)) or (n == 3 and parts[1] in _SPLITS)


def _scan_dir(root: Path) -> dict[str, Path]:
    def unreadable(e: OSError) -> None:
        raise UserError(f"cannot read directory {e.filename} ({first_line(e)}): check its permissions")

    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        rel = _parts(os.path.relpath(folder, root))
        dirs[:] = [d for d in dirs if not _ignored(d) and _may_hold_wanted((*rel, d))]
        for name in files:
            if _wanted(parts := (*rel, name)):
                found["/".join(parts)] = Path(folder, name)
    return found


def _open_tar_bytes(path: Path) -> BinaryIO:
    """The tar bytes inside `path`, choosing the decompressor by magic number, not by file name.

    A compressed tar is inflated into memory in one go: tarfile seeks before every member, and seeking a
    GzipFile is slow Python code, while the data (about 200 MB for CIFAR-10) fits in memory easily.
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    for prefix, opener in ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open)):
        if magic.startswith(prefix):
            with opener(path, "rb") as compressed:
                return io.BytesIO(compressed.read())
    return open(path, "rb")


def _check_tar_end(stream: BinaryIO, offset: int) -> None:
    """Require zero blocks from where tarfile stopped to the end of the data.

    tarfile ends iteration silently at a damaged header or at a truncation on a member boundary; only
    the end-of-archive marker tells those apart from a complete archive.
    """
    stream.seek(offset)
    length = 0
    while chunk := stream.read(1 << 20):  # in chunks: after a damaged header the rest can be most of the file
        if chunk.strip(b"\0"):
            raise tarfile.ReadError(f"damaged tar header at byte {offset}")
        length += len(chunk)
    if length < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker after byte {offset}")


def _member_name(source: Path, rel: str) -> str:
    return str(source / rel) if source.is_dir() else f"{source}:{rel}"


# --- image-folder trees ----------------------------------------------------------------------------------

def _decode_folders(members: Members, source: Path) -> CifarData:
    """The single [root/]train|test/<class>/<file> tree in `members`."""
    roots: set[tuple[str, ...]] = set()
    files: dict[str, list[tuple[str, str]]] = {split: [] for split in _SPLITS}  # split -> [(class, rel)]
    for rel in members:
        parts = _parts(rel)
        roots.add(parts[:-3])
        files[parts[-3]].append((parts[-2], rel))
    if len(roots) > 1:
        listed = ", ".join(sorted("/".join(r) or "." for r in roots))
        raise UserError(f"several train/test trees in {source} ({listed}): point --data-dir at one of them")
    if not files["train"] or not files["test"]:
        missing = " and ".join(f"{s}/<class>/" for s in _SPLITS if not files[s])
        raise UserError(f"no {missing} images in {source}: pass an image-folder tree with train/<class>/ and "
                        f"test/<class>/ folders, or the official {OFFICIAL_DIR} files")
    classes = sorted({cls for cls, _ in files["train"]})
    for cls, rel in files["test"]:
        if cls not in classes:
            raise UserError(f"test class folder {_member_name(source, rel.rpartition('/')[0])} has no matching "
                            f"train folder: rename or remove it (train classes: {', '.join(classes)})")
    index = {cls: i for i, cls in enumerate(classes)}
    arrays = []  # train images, train labels, test images, test labels
    for split in _SPLITS:
        entries = sorted(files[split])  # by class, then by file name
        arrays += [_decode_images([(rel, members[rel]) for _, rel in entries], source),
                   np.array([index[cls] for cls, _ in entries], dtype=np.int64)]
    kind = "image-folder directory" if source.is_dir() else "image-folder archive"
    return CifarData(*arrays, classes, *channel_stats(arrays[0]), f"{kind} {source}")


def _decode_images(entries: Sequence[tuple[str, bytes]], source: Path) -> np.ndarray:
    # A plain loop: PIL holds the GIL for most of a 32x32 decode, so a thread pool measured slower.
    out = np.empty((len(entries), _SIZE, _SIZE, 3), dtype=np.uint8)
    for i, (rel, data) in enumerate(entries):
        try:
            with Image.open(io.BytesIO(data)) as im:
                size = im.size
                if size == (_SIZE, _SIZE):
                    out[i] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except UnidentifiedImageError as e:
            raise UserError(f"not an image ({_member_name(source, rel)}): remove it or replace it with a "
                            f"PNG/JPEG") from e
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
            raise UserError(f"corrupt image ({_member_name(source, rel)}): {first_line(e)}; remove it or replace it "
                            f"with a PNG/JPEG") from e
        if size != (_SIZE, _SIZE):
            raise UserError(f"image is {size[0]}x{size[1]}, not {_SIZE}x{_SIZE} ({_member_name(source, rel)}): "
                            f"resize or remove it")
    return out


# --- official python batches -----------------------------------------------------------------------------

class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what the official batches hold (numpy arrays, lists, bytes): no arbitrary code."""

    _allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                ("_codecs", "encode"): codecs.encode,  # how protocol 2 spells bytes under Python 3
                # numpy 2 renamed numpy.core to numpy._core: pickles name either
                **{(f"{core}.multiarray", name): obj.__reduce__()[0] for core in ("numpy.core", "numpy._core")
                   for name, obj in (("_reconstruct", np.empty(0)), ("scalar", np.int64(0)))}}

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}") from None


def _unpickle(data: bytes, name: str) -> dict[str, object]:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises a zoo of exceptions on damaged input
        raise UserError(f"corrupt CIFAR-10 batch ({name}): {first_line(e)}; re-download the official files") from e
    if not isinstance(obj, dict):
        raise UserError(f"corrupt CIFAR-10 batch ({name}): not a dict; re-download the official files")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _decode_official(members: Members, source: Path) -> CifarData:
    found = {rel.rpartition("/")[2]: rel for rel in members if _is_official(_parts(rel))}
    if missing := [f for f in _OFFICIAL_FILES if f not in found]:
        raise UserError(f"incomplete official CIFAR-10 files in {source}: missing {', '.join(missing)}; "
                        f"delete it and download {OFFICIAL_ARCHIVE} again (--download)")
    if len({found[f].rpartition("/")[0] for f in _OFFICIAL_FILES}) > 1:
        raise UserError(f"official CIFAR-10 files spread over several folders in {source}: point --data-dir "
                        f"at the {OFFICIAL_DIR} folder")
    meta = _member_name(source, found["batches.meta"])
    names = _unpickle(members[found["batches.meta"]], meta).get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
        raise UserError(f"corrupt CIFAR-10 meta file ({meta}): no label_names list; re-download the official files")
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    batches = {f: _batch(members[found[f]], _member_name(source, found[f]), len(classes))
               for f in (*_TRAIN_BATCHES, "test_batch")}
    train = [np.concatenate(parts) for parts in zip(*(batches[f] for f in _TRAIN_BATCHES))]
    return CifarData(*train, *batches["test_batch"], classes, *channel_stats(train[0]),
                     f"official CIFAR-10 python batches {source}")


def _batch(member: bytes, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(member, name)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        problem = "no 'data' array or 'labels'"
    elif data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _SIZE * _SIZE:
        problem = f"data is {data.dtype} {data.shape}, expected uint8 (N, 3072)"
    elif (labels := np.asarray(labels)).shape != (len(data),) or labels.dtype.kind not in "iu" or (
            len(labels) and not 0 <= labels.min() <= labels.max() < num_classes):
        problem = f"labels do not match the {len(data)} images or the {num_classes} classes"
    else:  # rows are channel-planar (R plane, G plane, B plane); the rest of fastcifar uses HWC
        return np.ascontiguousarray(data.reshape(-1, 3, _SIZE, _SIZE).transpose(0, 2, 3, 1)), labels.astype(np.int64)
    raise UserError(f"corrupt CIFAR-10 batch ({name}): {problem}; re-download the official files")


# --- command line ----------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastcifar.data",
                                description="Load CIFAR-10 and print per-class counts and channel statistics.")
    p.add_argument("--data-dir", metavar="PATH", help="image-folder tree or .tar/.tar.gz/.tgz/.zip archive, or "
                   f"the official {OFFICIAL_DIR} files or {OFFICIAL_ARCHIVE} (default: the cache directory)")
    p.add_argument("--download", action="store_true", default=None,
                   help="download the official archive into the cache when missing (default: only when online)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where downloads and decoded arrays live (default: $FASTCIFAR_HOME or ~/.cache/fastcifar)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the decoded-array cache")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def format_data_summary(data: CifarData) -> str:
    train, test = (np.bincount(labels, minlength=len(data.classes)) for labels in (data.train_labels, data.test_labels))
    width = max(12, *(len(c) for c in data.classes))
    rows = [("class", "train", "test"), *zip(data.classes, train, test),
            ("total", len(data.train_labels), len(data.test_labels))]
    lines = [f"source: {data.source}"] + [f"{c:<{width}} {a:>8} {b:>8}" for c, a, b in rows]
    lines.append("train mean: " + " ".join(f"{v:.5f}" for v in data.mean))
    lines.append("train std:  " + " ".join(f"{v:.5f}" for v in data.std))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    data = load_cifar10(args.data_dir, download=args.download, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    print(format_data_summary(data))
    print(f"loaded in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="fastcifar.data"))
