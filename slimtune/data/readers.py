"""Load a dataset file or folder into normalised chat/text rows, counting the rows that had to be skipped.

Accepted inputs:

* ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines are ignored).
* ``.json``: a list of objects, an object with one list field (``{"data": [...]}``), or a single row; a
  ``.json`` file that is really JSON Lines is read as such.
* ``.csv`` / ``.tsv``: a header row, then one row per example; quoted fields may contain line breaks, and
  ``messages``/``conversations``/``prompt``/``completion`` cells may hold JSON lists of turns.
* ``.parquet`` and ``.arrow`` (Arrow IPC file or stream); these need ``pyarrow``.
* A folder saved by ``datasets.Dataset.save_to_disk`` (it has ``dataset_info.json``/``state.json``); needs
  ``datasets``. A saved ``DatasetDict`` uses its ``train`` split, or its only split.
* A folder of data files of ONE type, read in name order; other files (README.md, ...) are ignored.

Row layouts are described in `slimtune.data.formats`. Text must be UTF-8 (a byte-order mark is fine).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slimtune.data import _files
from slimtune.data._files import FILE_TYPES, RawRecord, file_type
from slimtune.data.describe import describe, short_names
from slimtune.data.formats import (
    EXPECTED_LAYOUTS,
    TOOL_MESSAGE_POLICIES,
    detect_format,
    layout_hint,
    normalize_record,
    text_size,
)
from slimtune.data.media_columns import MediaColumnError
from slimtune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MAX_ROW_CHARS = 1_000_000
"""Rows with more characters of text than this (about 1 MB) are skipped: they cannot fit any context window."""

MAX_UNRECOGNISED_ROWS = 100
"""If this many rows in a row match no layout before any row does, reading stops with an error."""

HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
"""Files that mark a folder written by ``datasets``' ``save_to_disk``."""

_NO_LAYOUT = "matches no supported layout"
_MAX_COLUMNS = 100  # column names kept for reports; a wide table does not need them all listed
_PREVIEW_CHARS = 4000  # longer strings are shortened in previews so a UI is not sent megabytes


@dataclass(frozen=True)
class SkipInfo:
    """A row that was left out, and why."""

    location: str
    """Where the row is, e.g. ``data.jsonl:17`` or ``data.csv:row 5``."""
    reason: str
    """Why it was left out, e.g. ``turn 2 has empty content``."""


@dataclass
class DatasetLoad:
    """The result of `load_records`."""

    rows: list[dict[str, Any]]
    """Normalised rows: ``{"messages": [...]}`` or ``{"text": str}``."""
    format: str
    """The layout of the dataset, one of `slimtune.data.formats.FORMATS`."""
    n_read: int
    """Rows read from the source (kept plus skipped; blank lines are not rows)."""
    n_skipped: int
    """Rows left out."""
    skipped: list[SkipInfo]
    """The first few skipped rows (``max_skip_examples``), for reporting."""
    columns: list[str]
    """Column names / top-level keys found, in order of first appearance."""
    source: str
    """The path that was read."""


def load_records(path: str | Path, *, tool_messages: str = "keep", max_skip_examples: int = 5,
                 max_row_chars: int = MAX_ROW_CHARS) -> DatasetLoad:
    """Read a dataset file or folder, detect its layout and normalise every row.

    The layout is decided by the first row that is valid. Later rows of a different layout, rows that break a
    rule (empty content, unknown role, no final assistant reply, ...), unparsable lines and rows longer than
    `max_row_chars` are skipped and counted, never fatal. In a folder, each file's first valid row must have
    the layout of the first file; otherwise the files are refused as mixed.

    Args:
        path: a data file or folder (see the module docstring for what is accepted).
        tool_messages: ``"keep"`` keeps tool/function turns; ``"reject"`` skips rows that contain them.
        max_skip_examples: how many skipped rows to describe in ``DatasetLoad.skipped`` (all are counted).
        max_row_chars: rows with more characters of text than this are skipped.

    Returns:
        A `DatasetLoad` with the normalised rows and counts.

    Raises:
        DataError: the source is missing, empty, unreadable, in an unsupported type or encoding, matches no
            supported layout, mixes layouts across files, or has no usable row at all.
        ConfigError: an argument has an unsupported value.

    Example:
        >>> load = load_records("train.jsonl")
        >>> load.format, len(load.rows), load.n_skipped
        ('messages', 998, 2)
    """
    problems = []
    if tool_messages not in TOOL_MESSAGE_POLICIES:
        problems.append(f"tool_messages={tool_messages!r} is not supported; use 'keep' or 'reject'")
    if max_skip_examples < 0:
        problems.append(f"max_skip_examples={max_skip_examples} must be 0 or more")
    if max_row_chars < 1:
        problems.append(f"max_row_chars={max_row_chars} must be 1 or more")
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    root = Path(path).expanduser()
    collector = _Collector(str(path), tool_messages, max_skip_examples, max_row_chars)
    for source in list_sources(root):
        collector.start_file()
        for raw in iter_raw_records(source):
            collector.add(raw)
    return collector.finish()


def summarize_dataset(path: str | Path, *, n_preview: int = 5) -> dict[str, Any]:
    """Describe a dataset for a preview: layout, columns, counts, skipped rows and the first rows.

    Args:
        path: a data file or folder, as for `load_records`.
        n_preview: how many normalised rows to include.

    Returns:
        A JSON-serialisable dict with keys ``source``, ``format``, ``columns``, ``n_rows``, ``n_read``,
        ``n_skipped``, ``skipped`` (``[{"location", "reason"}]``) and ``preview``. In the preview, bytes are
        replaced by ``"<N bytes>"`` and strings over 4000 characters are shortened.

    Raises:
        DataError: as for `load_records`.
    """
    load = load_records(path)
    return {"source": load.source, "format": load.format, "columns": load.columns, "n_rows": len(load.rows),
            "n_read": load.n_read, "n_skipped": load.n_skipped, "skipped": [asdict(s) for s in load.skipped],
            "preview": [_jsonable(row) for row in load.rows[:max(n_preview, 0)]]}


def list_sources(path: Path) -> list[Path]:
    """The files (or the one ``save_to_disk`` folder) that make up the dataset at `path`.

    Raises:
        DataError: the path is missing, has an unsupported extension, or is a folder without data files or
            with data files of different types.
    """
    try:
        return _list_sources(path)
    except OSError as exc:  # unreadable folder, name too long, ...
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


def _list_sources(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if not path.is_dir():
        if file_type(path) is None:
            raise DataError(_unsupported_message(path))
        return [path]
    if any((path / marker).is_file() for marker in HF_DATASET_MARKERS):
        return [path]
    entries = sorted((p for p in path.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    files = [p for p in entries if p.is_file() and file_type(p) is not None]
    if not files:
        found = [p.name + ("/" if p.is_dir() else "") for p in entries][:20]
        raise DataError(f"{path}: the folder has no data files ({', '.join(sorted(FILE_TYPES))}); found: "
                        f"{found!r}")
    types = {file_type(p) for p in files}
    if len(types) > 1:
        listing = ", ".join(f"{p.name} ({file_type(p)})" for p in files[:20])
        raise DataError(f"{path}: the folder mixes file types: {listing}. Keep one type of file per folder.")
    ignored = [p.name for p in entries if p not in files]
    if ignored:
        logger.warning("%s: ignoring %d entries that are not %s files: %s", path, len(ignored), types.pop(),
                       ", ".join(ignored[:10]))
    return files


def iter_raw_records(source: Path) -> Iterator[RawRecord]:
    """Yield the rows of one file or ``save_to_disk`` folder as stored, each with its location.

    Raises:
        DataError: the source cannot be read at all (unparsable rows are yielded with ``error`` set instead).
    """
    if source.is_dir():
        return _iter_hf_dataset(source)
    return _files.iter_file(source, source.name)


def _unsupported_message(path: Path) -> str:
    hint = ""
    if path.suffix.lower() in {".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".7z"}:
        hint = " Compressed files are not read directly; decompress it first."
    return (f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use one of "
            f"{', '.join(sorted(FILE_TYPES))}, or a folder of such files.{hint}")


def _iter_hf_dataset(folder: Path) -> Iterator[RawRecord]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{folder} was saved with Hugging Face datasets' save_to_disk; reading it needs the "
                        f"datasets library: `pip install datasets`.") from exc
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ValueError, ArrowInvalid, ...)
        raise DataError(f"{folder}: cannot load the saved dataset ({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in splits and len(splits) != 1:
            raise DataError(f"{folder} holds the splits {splits!r} and none is 'train'; pass one split's "
                            f"folder instead, e.g. {folder}/<split>")
        loaded = loaded["train" if "train" in splits else splits[0]]
    try:
        # Arrow format hands back the stored values (image structs stay bytes) instead of decoding media.
        yield from _files.iter_batches(folder, folder.name, loaded.with_format("arrow").iter(batch_size=1024))
    except DataError:
        raise
    except Exception as exc:  # a damaged Arrow shard surfaces only while reading
        raise DataError(f"{folder}: cannot read the saved dataset ({type(exc).__name__}: {exc})") from exc


class _Collector:
    """Turns raw rows into normalised rows, deciding the layout and counting skips."""

    def __init__(self, source: str, tool_messages: str, max_skip_examples: int, max_row_chars: int):
        self.source, self.tool_messages = source, tool_messages
        self.max_skip_examples, self.max_row_chars = max_skip_examples, max_row_chars
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[SkipInfo] = []
        self.n_read = self.n_skipped = self.n_recognised = 0
        self.columns: dict[str, None] = {}  # an ordered set
        self.format: str | None = None
        self.decided_at = ""  # location of the row that decided the format
        self.file_format: str | None = None

    def start_file(self) -> None:
        self.file_format = None

    def skip(self, location: str, reason: str) -> None:
        self.n_skipped += 1
        if len(self.skipped) < self.max_skip_examples:
            self.skipped.append(SkipInfo(location, reason))

    def add(self, raw: RawRecord) -> None:
        self.n_read += 1
        if raw.error is not None:
            return self.skip(raw.location, raw.error)
        record = raw.value
        if not isinstance(record, Mapping):
            return self.skip(raw.location, f"row is {describe(record)}, expected an object with named fields")
        for key in record:
            if len(self.columns) < _MAX_COLUMNS:
                self.columns.setdefault(str(key), None)
        fmt = detect_format(record)
        if fmt is None:
            if self.format is None and self.n_read - self.n_recognised >= MAX_UNRECOGNISED_ROWS:
                raise self._no_format_error()
            return self.skip(raw.location, f"{_NO_LAYOUT} (keys: {short_names(record, limit=10)!r})")
        self.n_recognised += 1
        if self.file_format is not None and fmt != self.file_format:
            return self.skip(raw.location, f"row is in {fmt} format, but the dataset is in {self.file_format} "
                                           f"format (decided by {self.decided_at})")
        try:
            row = normalize_record(record, fmt, tool_messages=self.tool_messages)
        except MediaColumnError as exc:  # media paired with the wrong text must not be skipped silently
            raise DataError(f"{raw.location}: {exc}") from exc
        except DataError as exc:
            return self.skip(raw.location, str(exc))
        size = text_size(row)
        if size > self.max_row_chars:
            return self.skip(raw.location, f"row has {size:,} characters of text, over the "
                                           f"{self.max_row_chars:,} limit")
        if self.file_format is None:
            self._decide(fmt, raw.location)
        self.rows.append(row)

    def _decide(self, fmt: str, location: str) -> None:
        if self.format is None:
            self.format, self.decided_at = fmt, location
        elif fmt != self.format:
            raise DataError(f"{self.source}: the files use different formats: {self.decided_at} is "
                            f"{self.format} but {location} is {fmt}. Keep one format per dataset.")
        self.file_format = fmt

    def _no_format_error(self) -> DataError:
        columns = list(self.columns)
        message = (f"{self.source}: no supported format; columns found: {short_names(columns)!r}. Expected one "
                   f"of: {EXPECTED_LAYOUTS}.{layout_hint(columns)}")
        first = next((s for s in self.skipped if not s.reason.startswith(_NO_LAYOUT)), None)
        if first is not None:  # e.g. some lines were not even JSON
            message += f" Other problem: {first.location}: {first.reason}."
        return DataError(message)

    def finish(self) -> DatasetLoad:
        if not self.rows:
            if self.n_recognised == 0 and self.columns:  # there were named fields, just not ones we know
                raise self._no_format_error()
            examples = "; ".join(f"{s.location}: {s.reason}" for s in self.skipped[:3])
            counted = "the only row was" if self.n_read == 1 else f"all {self.n_read} rows were"
            raise DataError(f"{self.source}: no usable rows; {counted} skipped" + (f" ({examples})." if examples
                                                                                  else "."))
        if self.n_skipped:
            first = self.skipped[0] if self.skipped else None
            logger.warning("%s: skipped %d of %d rows%s", self.source, self.n_skipped, self.n_read,
                           f" (first: {first.location}: {first.reason})" if first else "")
        assert self.format is not None  # set together with the first row
        return DatasetLoad(rows=self.rows, format=self.format, n_read=self.n_read, n_skipped=self.n_skipped,
                           skipped=self.skipped, columns=list(self.columns), source=self.source)


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of `value` for previews (bytes summarised, long strings shortened, depth bounded)."""
    if depth > 32:
        return "…"
    if isinstance(value, str):
        extra = len(value) - _PREVIEW_CHARS
        return value if extra <= 0 else f"{value[:_PREVIEW_CHARS]}… ({extra:,} more characters)"
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # NaN/Infinity are not valid JSON
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    return str(value)


__all__ = [
    "MAX_ROW_CHARS",
    "DatasetLoad",
    "SkipInfo",
    "iter_raw_records",
    "list_sources",
    "load_records",
    "summarize_dataset",
]
