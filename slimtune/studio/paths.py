"""Where the Studio keeps its files, and the checks that keep every route inside the data directory."""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException

_ID_RE = re.compile(r"^[a-z0-9]{6,32}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
DATASET_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
MAX_NAME_LEN = 100


@dataclass(frozen=True)
class DataDirs:
    """The layout of the data directory; every path the Studio writes is one of these or below one."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "studio.sqlite3"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def incoming(self) -> Path:
        """Uploads land here first and are moved into ``datasets`` once complete and under the cap."""
        return self.root / "datasets" / ".incoming"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def cache(self) -> Path:
        """Zips built for download; safe to delete at any time."""
        return self.root / "cache"

    def create(self) -> None:
        """Make every folder (owner-only where the OS allows, since uploads may be private)."""
        for d in (self.root, self.datasets, self.incoming, self.runs, self.exports, self.logs, self.models, self.cache):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)


def new_id() -> str:
    """A random 12-character id for runs, datasets, models and exports (unguessable, URL-safe)."""
    return secrets.token_hex(6)


def check_id(value: str, what: str = "id") -> str:
    """Reject ids that are not plain lowercase hex/alphanumerics, so an id can never name a path.

    Raises:
        HTTPException: 400 for anything else (``..``, slashes, encoded dots, absolute paths).
    """
    if not _ID_RE.fullmatch(value):
        raise HTTPException(status_code=400, detail=f"Invalid {what}: expected 6-32 lowercase letters or digits.")
    return value


def sanitize_filename(name: str, *, allowed_ext: tuple[str, ...] = DATASET_EXTENSIONS) -> str:
    """Turn a user-supplied file name into a safe, flat one.

    Keeps only the last path component, folds Unicode to ASCII, replaces anything but letters, digits,
    ``.``, ``_`` and ``-`` with ``_``, strips leading dots (no hidden files, no ``..``) and caps the length.

    Raises:
        HTTPException: 400 when nothing usable is left or the extension is not an accepted dataset type.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    base = _UNSAFE_CHARS.sub("_", base).lstrip("._-")
    if len(base) > MAX_NAME_LEN:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: MAX_NAME_LEN - len(ext) - 1] + dot + ext) if dot else base[:MAX_NAME_LEN]
    if not base or "." not in base:
        raise HTTPException(status_code=400, detail=f"Invalid file name {name!r}: it needs a name and an extension.")
    if not base.lower().endswith(allowed_ext):
        raise HTTPException(
            status_code=400,
            detail=f"Unsupported file type {name!r}: use one of {', '.join(allowed_ext)}.",
        )
    return base


def slug(name: str, fallback: str) -> str:
    """A file-name-safe version of a display name (for download names and zip folder names)."""
    base = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    base = _UNSAFE_CHARS.sub("_", base).strip("._-")[:MAX_NAME_LEN]
    return base or fallback


def resolve_inside(root: Path, *parts: str | Path, must_exist: bool = True) -> Path:
    """Join ``parts`` onto ``root`` and make sure the real path (symlinks followed) stays under ``root``.

    Raises:
        HTTPException: 400 if the result escapes ``root`` (``..``, absolute parts, symlinks out),
            404 if ``must_exist`` and nothing is there.
    """
    root_real = root.resolve()
    for part in parts:
        p = str(part)
        if p.startswith(("/", "\\")) or "\x00" in p or (len(p) > 1 and p[1] == ":"):
            raise HTTPException(status_code=400, detail="Absolute paths are not allowed.")
    candidate = root_real.joinpath(*[str(p) for p in parts]).resolve()
    if not candidate.is_relative_to(root_real):
        raise HTTPException(status_code=400, detail="Path escapes the Studio data directory.")
    if must_exist and not candidate.exists():
        raise HTTPException(status_code=404, detail="File not found.")
    return candidate
