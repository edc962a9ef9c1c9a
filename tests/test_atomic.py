"""Atomic file replacement: the new file gets the mode a plain open() would give; a failed write leaves the old file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorakit.atomic import atomic_write


def test_replaces_with_the_usual_file_mode(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = tmp_path / "target.txt"
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new"
    assert os.stat(target).st_mode == os.stat(plain).st_mode  # not mkstemp's private 0600


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("old")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["target.txt"]
