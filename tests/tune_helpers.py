"""What the tests of fastcifar.tune and its modules share: a small search space and a writer for space files."""

from __future__ import annotations

from pathlib import Path

SPACE = """
[lr]
low = 0.05
high = 0.8
log = true

[label_smoothing]
choices = [0.0, 0.2]
"""


def space_file(folder: Path, text: str = SPACE, name: str = "space.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path
