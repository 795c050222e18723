"""Parse one dataset file into raw rows, each tagged with where it came from.

Rows come out exactly as stored (no layout checks; `slimtune.data.formats` decides what they mean). A row that
cannot be parsed comes out as a `RawRecord` with ``error`` set, so the caller can skip and count it. A file that
cannot be read at all raises `DataError` naming the file, and the line where that helps.

Text files (.jsonl, .json, .csv, .tsv) must be UTF-8; a UTF-8 byte-order mark is accepted. UTF-16/32, Latin-1
and binary files are refused with a message that says how to re-encode.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.data.describe import describe, short_names
from slimtune.data.formats import CHAT_KEYS, EXPECTED_LAYOUTS, detect_format
from slimtune.errors import DataError

FILE_TYPES: dict[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
                              ".tsv": "tsv", ".parquet": "parquet", ".arrow": "arrow"}
"""File extension (lower-case) → file type."""

MAX_LEADING_BAD_LINES = 5
"""A JSON Lines file whose first this-many non-blank lines are all invalid is refused as a whole."""

_HEAD_BYTES = 8192  # enough to recognise byte-order marks, magic numbers and UTF-16 text
_BATCH_ROWS = 1024  # Arrow rows converted to Python at a time
_CSV_FIELD_LIMIT = 1 << 30  # the csv module's default (128 KiB) would reject a long reply outright
_JSON_CELL_KEYS = frozenset(CHAT_KEYS) | {"prompt", "completion"}  # cells that may hold JSON-encoded turns
_JSON_WHITESPACE = " \t\n\r"
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16: same prefix
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_MAGIC = ((b"PAR1", "a Parquet file; give it the .parquet extension"),
          (b"ARROW1", "an Arrow file; give it the .arrow extension"),
          (b"\x1f\x8b", "gzip-compressed; decompress it first (gunzip)"),
          (b"PK\x03\x04", "a zip archive; extract it first"))


@dataclass(frozen=True)
class RawRecord:
    """One row as stored in the file, or the reason it could not be parsed."""

    location: str
    """Where the row is: ``data.jsonl:17``, ``data.csv:row 5``, ``data.json:item 3 (line 12)``."""
    value: Any = None
    """The parsed row, usually a dict; None when ``error`` is set."""
    error: str | None = None
    """Why the row could not be parsed; such rows are skipped and counted."""


def file_type(path: Path) -> str | None:
    """The file type for `path`'s extension (a key of `FILE_TYPES`'s values), or None if unsupported."""
    return FILE_TYPES.get(path.suffix.lower())


def iter_file(path: Path, name: str) -> Iterator[RawRecord]:
    """Yield the rows of one data file (type chosen by extension), locations prefixed with `name`.

    Raises:
        DataError: the file is missing, empty, not UTF-8, binary, or unreadable as its type.
    """
    kind = file_type(path)
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_TYPES)}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    if size == 0:
        raise DataError(f"{path} is empty")
    return _READERS[kind](path, name)


# --- text decoding -----------------------------------------------------------------------------------------------


def _check_head(path: Path, head: bytes) -> int:
    """Refuse non-UTF-8 or binary files by their first bytes; return how many BOM bytes to drop."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            raise DataError(f"{path} is encoded as {encoding} (it starts with a {encoding} byte-order mark); "
                            f"slimtune reads UTF-8. Re-encode it, e.g. `iconv -f {encoding} -t UTF-8 "
                            f"{path.name} > utf8-{path.name}`.")
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path} looks like {what}; it is not {path.suffix} text.")
    if b"\x00" in head:
        # UTF-16 without a BOM puts a zero byte beside nearly every ASCII character: after it in little-endian
        # order, before it in big-endian order.
        zeros_even, zeros_odd = head[0::2].count(0), head[1::2].count(0)
        if max(zeros_even, zeros_odd) > len(head) // 4:
            encoding = "UTF-16LE" if zeros_odd > zeros_even else "UTF-16BE"
            raise DataError(f"{path} looks like {encoding} text without a byte-order mark; slimtune reads UTF-8. "
                            f"Re-encode it, e.g. `iconv -f {encoding} -t UTF-8 {path.name} > utf8-{path.name}`.")
        raise DataError(f"{path} contains NUL bytes; it looks like a binary file, not {path.suffix} text.")
    return len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0


def _decode_error(path: Path, data: bytes, exc: UnicodeDecodeError, first_line: int = 1) -> DataError:
    line = first_line + data.count(b"\n", 0, exc.start)
    column = exc.start - data.rfind(b"\n", 0, exc.start)
    return DataError(f"{path}:{line}: byte 0x{data[exc.start]:02x} at column {column} is not valid UTF-8. "
                     f"slimtune reads UTF-8 (a BOM is fine); this file is probably Latin-1 or Windows-1252. "
                     f"Re-encode it, e.g. `iconv -f WINDOWS-1252 -t UTF-8 {path.name} > utf8-{path.name}`.")


def _read_text(path: Path) -> str:
    """The whole file as text; refuses empty, non-UTF-8 and binary files."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    body = data[_check_head(path, data[:_HEAD_BYTES]):]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _decode_error(path, body, exc) from exc
    if not text.strip():
        raise DataError(f"{path} is empty (it holds only whitespace)")
    return text


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file read line by line, so large JSON Lines files are never held as bytes."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    with handle:
        handle.seek(_check_head(path, handle.read(_HEAD_BYTES)))
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _decode_error(path, raw, exc, first_line=number) from exc


# --- JSON Lines and JSON -------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path, name: str) -> Iterator[RawRecord]:
    return _parse_lines(path, name, _decoded_lines(path))


def _parse_lines(path: Path, name: str, lines: Iterable[tuple[int, str]]) -> Iterator[RawRecord]:
    n_parsed = 0
    leading_bad: list[str] = []
    for number, line in lines:
        if not line.strip():
            continue  # blank lines (often a trailing one) are not rows
        location = f"{name}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            reason = f"invalid JSON ({exc.msg}, column {exc.colno})"
        except ValueError as exc:  # not a syntax error: e.g. an integer longer than Python converts (4300 digits)
            reason = f"invalid JSON ({exc})"
        except RecursionError:
            reason = "invalid JSON (nested too deeply to parse)"
        else:
            n_parsed += 1
            yield RawRecord(location, value)
            continue
        if n_parsed == 0:
            # A file that starts with nothing but bad lines is the wrong kind of file, not a few bad rows.
            leading_bad.append(f"{location}: {reason}")
            if len(leading_bad) >= MAX_LEADING_BAD_LINES:
                raise DataError(f"{path}: the first {len(leading_bad)} lines are not valid JSON "
                                f"({leading_bad[0]}). A JSON Lines file needs one JSON object per line; "
                                f"a single (pretty-printed) JSON document should be named .json.")
        yield RawRecord(location, error=reason)
    if n_parsed == 0 and not leading_bad:
        raise DataError(f"{path} is empty (it holds only whitespace)")


def _iter_json(path: Path, name: str) -> Iterator[RawRecord]:
    text = _read_text(path)
    start = _skip_ws(text, 0)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values one after another: JSON Lines named .json
            yield from _parse_lines(path, name, enumerate(text.split("\n"), 1))
            return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from exc
    except ValueError as exc:  # not a syntax error: e.g. an integer longer than Python converts (4300 digits)
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    except RecursionError as exc:
        raise DataError(f"{path}: the JSON is nested too deeply to read") from exc
    if isinstance(doc, dict) and detect_format(doc) is not None:
        yield RawRecord(f"{name}:item 1 (line {text.count(chr(10), 0, start) + 1})", doc)  # the file is one row
        return
    if isinstance(doc, dict):
        offset = _member_offset(text, start, _list_field(path, doc))
    elif isinstance(doc, list):
        offset = start
    else:
        raise DataError(f"{path} holds {describe(doc)}; expected a list of rows or an object with one list "
                        f"field such as {{\"data\": [...]}}")
    del doc  # the rows are decoded again one by one below, to learn the line each starts on
    yield from _array_items(path, name, text, offset)


def _list_field(path: Path, doc: dict[str, Any]) -> str:
    """The key of the one list field in a wrapper object such as ``{"version": 2, "data": [...]}``."""
    lists = [key for key, value in doc.items() if isinstance(value, list)]
    if len(lists) > 1:  # prefer the one list that holds objects
        lists = [k for k in lists if doc[k] and all(isinstance(v, dict) for v in doc[k][:20])] or lists
    if len(lists) == 1:
        return lists[0]
    if not lists:
        raise DataError(f"{path}: no supported format; keys found: {short_names(doc)!r}. Expected a list of "
                        f"rows, an object with one list field such as {{\"data\": [...]}}, or one row with one "
                        f"of: {EXPECTED_LAYOUTS}.")
    raise DataError(f"{path}: the top-level object has several list fields {short_names(lists)!r}; keep only the "
                    f"one that holds the rows, e.g. {{\"data\": [...]}}")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _JSON_WHITESPACE:
        i += 1
    return i


def _member_offset(text: str, start: int, key: str) -> int:
    """Offset of the value of top-level member `key` in an already validated JSON object at `start`."""
    decoder = json.JSONDecoder()
    i = start + 1  # past "{"
    while True:
        name, i = decoder.raw_decode(text, _skip_ws(text, i))
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ":"
        if name == key and text[i] == "[":  # with duplicate keys json.loads kept the list; find that one
            return i
        _, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, i) + 1  # past ","


def _array_items(path: Path, name: str, text: str, offset: int) -> Iterator[RawRecord]:
    """Items of the validated JSON array at `offset`, each located by index and starting line."""
    decoder = json.JSONDecoder()
    line, counted_to, index = 1, 0, 0
    i = _skip_ws(text, offset + 1)
    while text[i] != "]":
        value, end = decoder.raw_decode(text, i)
        line += text.count("\n", counted_to, i)
        counted_to = i
        index += 1
        yield RawRecord(f"{name}:item {index} (line {line})", value)
        i = _skip_ws(text, end)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    if index == 0:
        raise DataError(f"{path} has no rows (the list is empty)")


# --- CSV and TSV ---------------------------------------------------------------------------------------------------


def _iter_csv(path: Path, name: str) -> Iterator[RawRecord]:
    return _iter_delimited(path, name, ",")


def _iter_tsv(path: Path, name: str) -> Iterator[RawRecord]:
    return _iter_delimited(path, name, "\t")


def _iter_delimited(path: Path, name: str, delimiter: str) -> Iterator[RawRecord]:
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    # The field limit is process-wide; raise it only while parsing (eagerly) and put it back.
    old_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        rows = [cells for cells in reader if cells]  # [] is a blank line
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: cannot parse as {path.suffix} ({exc})") from exc
    finally:
        csv.field_size_limit(old_limit)
    if not rows:
        raise DataError(f"{path} is empty (it holds only blank lines)")
    columns = _header(path, rows[0], delimiter)
    if len(rows) == 1:
        raise DataError(f"{path} has a header {short_names(columns)!r} but no rows")
    for number, cells in enumerate(rows[1:], 1):
        location = f"{name}:row {number}"
        if len(cells) != len(columns):
            yield RawRecord(location, error=f"row has {len(cells)} field{'s' * (len(cells) != 1)} but the header "
                                            f"has {len(columns)} (a separator or line break in an unquoted value?)")
        else:
            yield RawRecord(location, _decode_json_cells(dict(zip(columns, cells))))


def _header(path: Path, cells: list[str], delimiter: str) -> list[str]:
    # Unnamed columns (e.g. Excel's trailing empty ones) get a placeholder so rows still line up.
    columns = [c.strip() or f"column_{i}" for i, c in enumerate(cells, 1)]
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise DataError(f"{path}: column names {short_names(duplicates)!r} appear more than once in the header")
    if len(columns) == 1:
        for sep, label in (("\t", "tabs"), (";", "semicolons"), (",", "commas")):
            if sep != delimiter and sep in columns[0]:
                raise DataError(f"{path}: the header {short_names(columns)[0]!r} looks separated by {label}; save it "
                                f"{'as .tsv' if sep == chr(9) else 'with commas as .csv'} and try again.")
    return columns


def _decode_json_cells(row: dict[str, Any]) -> dict[str, Any]:
    """Turn JSON-encoded turn lists in table cells (``messages`` as a CSV string) into lists."""
    for key, value in row.items():
        if (isinstance(key, str) and key.strip().lower() in _JSON_CELL_KEYS and isinstance(value, str)
                and value.lstrip().startswith("[")):
            try:
                parsed = json.loads(value)
            except (ValueError, RecursionError):
                continue  # left as text; the layout check explains that a list was expected
            if isinstance(parsed, list):
                row[key] = parsed
    return row


# --- Arrow-based files ----------------------------------------------------------------------------------------------


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as exc:
        raise DataError(f"{path}: reading {path.suffix} files needs pyarrow; install it with "
                        f"`pip install pyarrow`.") from exc
    return pyarrow


def iter_batches(path: Path, name: str, batches: Iterable[Any]) -> Iterator[RawRecord]:
    """Rows of Arrow record batches (or tables), located as ``name:row N``; refuses zero rows."""
    number = 0
    for batch in batches:
        # Readers trust the bytes: a damaged file can hold bad offsets or invalid UTF-8, which would crash (or
        # read out of bounds) when converted. Full validation turns that into an ArrowInvalid the caller reports.
        batch.validate(full=True)
        for row in batch.to_pylist():
            number += 1
            yield RawRecord(f"{name}:row {number}", _decode_json_cells(row))
    if number == 0:
        raise DataError(f"{path} has no rows")


def _iter_parquet(path: Path, name: str) -> Iterator[RawRecord]:
    pa = _pyarrow(path)
    try:
        parquet = pa.parquet.ParquetFile(str(path))
        yield from iter_batches(path, name, parquet.iter_batches(batch_size=_BATCH_ROWS))
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # damaged data or metadata
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).strip()})") from exc


def _iter_arrow(path: Path, name: str) -> Iterator[RawRecord]:
    pa = _pyarrow(path)
    try:
        try:
            reader = pa.ipc.open_file(str(path))  # random-access IPC file (also Feather v2)
            batches: Iterable[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            batches = pa.ipc.open_stream(str(path))  # IPC stream, which is what `datasets` writes
        yield from iter_batches(path, name, batches)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # damaged data or metadata
        raise DataError(f"{path}: not a readable Arrow IPC file or stream ({str(exc).strip()})") from exc


_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "csv": _iter_csv, "tsv": _iter_tsv,
            "parquet": _iter_parquet, "arrow": _iter_arrow}
