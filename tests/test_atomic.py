"""Atomic folders: a failure at any point leaves the previous version (or nothing), never a half-written one."""

import os

import pytest

from slimtune.utils import atomic
from slimtune.utils.atomic import atomic_dir


def test_error_inside_leaves_previous_version(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("boom")
    assert (target / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left


def test_failed_final_rename_restores_previous_version(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "v").write_text("1")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the rename of the new folder into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_refuses_existing_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "out"):
            pass
