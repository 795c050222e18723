"""Zipping folders (adapters, exports) for download, without ever packing files from outside the data dir."""

from __future__ import annotations

import os
import secrets
import zipfile
from pathlib import Path


def latest_mtime(folder: Path) -> float:
    """Newest modification time of any file under ``folder`` (0 if empty)."""
    newest = 0.0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                continue
    return newest


def zip_folder(folder: Path, dest: Path, *, root: Path, arc_prefix: str) -> Path:
    """Write ``folder`` into ``dest`` as a zip whose entries start with ``arc_prefix/``.

    Files whose real path leaves ``root`` (symlinks out of the data directory) are skipped. The zip is
    written beside ``dest`` and renamed into place, so a download never sees a half-written archive.
    Model weights compress poorly, so entries are stored when large and deflated when small.
    """
    root = root.resolve()
    tmp = dest.with_name(f"{dest.name}.{secrets.token_hex(4)}.part")  # concurrent builds don't collide
    with zipfile.ZipFile(tmp, "w") as zf:
        for dirpath, dirnames, files in os.walk(folder):
            dirnames.sort()
            for name in sorted(files):
                path = Path(dirpath) / name
                if not path.resolve().is_relative_to(root):
                    continue
                rel = path.relative_to(folder).as_posix()
                method = zipfile.ZIP_STORED if path.stat().st_size > 8 * 1024 * 1024 else zipfile.ZIP_DEFLATED
                zf.write(path, f"{arc_prefix}/{rel}", compress_type=method)
    os.replace(tmp, dest)
    return dest


def cached_zip(folder: Path, dest: Path, *, root: Path, arc_prefix: str) -> Path:
    """Reuse ``dest`` if it is newer than every file in ``folder``; rebuild it otherwise."""
    if dest.is_file() and dest.stat().st_mtime >= latest_mtime(folder):
        return dest
    return zip_folder(folder, dest, root=root, arc_prefix=arc_prefix)
