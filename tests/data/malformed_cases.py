"""The generated malformed datasets test_malformed_inputs.py loads: each case writes its input and says what
loading it must give. Kept apart from the tests so each file stays readable."""

from __future__ import annotations

import copy
import gzip
import io
import json
import random
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

LOCATION = re.compile(r"^[^:]+:(\d+|row \d+|item \d+ \(line \d+\))$")
NAMES_LINE = re.compile(r":\d+|:row \d+|line \d+|item \d+")


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], Path]
    """Writes the input under the given folder and returns the path to load."""
    expect: str = "either"
    """'error' (DataError), 'skip' (rows with counted skips), 'either', or 'any' (a clean load is also fine)."""
    line: bool = False
    """A DataError must also name the line or row."""
    kwargs: tuple[tuple[str, Any], ...] = ()


# --- record-level problems, in JSON Lines, JSON and Parquet ---------------------------------------------------------

U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello"}
GOOD = {
    "messages": {"messages": [U, A]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    "alpaca": {"instruction": "Say hi", "input": "", "output": "Hi"},
    "prompt_completion": {"prompt": "Say hi", "completion": "Hi"},
    "text": {"text": "Hello world"},
}


def _with_assistant(content: Any) -> dict[str, Any]:
    return {"messages": [U, {"role": "assistant", "content": content}]}


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


_BAD_CONTENT = {"null": None, "empty": "", "spaces": "  \n ", "int": 42, "float": 3.5, "bool": True,
                "empty_list": [], "int_list": [1, 2], "text_part_no_text": [{"type": "text"}],
                "text_part_number": [{"type": "text", "text": 5}], "unknown_part": [{"type": "pdf"}],
                "null_part": [None], "object": {"a": 1}, "string_parts": ["hi"], "nested_garbage": _deep(60),
                "part_no_type": [{"text": "hi"}], "blank_text_part": [{"type": "text", "text": " "}]}

# (name, layout of the good row it follows, bad record, whether it may also appear alone)
BAD_ROWS: list[tuple[str, str, Any, bool]] = [
    *[(f"content_{k}", "messages", _with_assistant(v), True) for k, v in _BAD_CONTENT.items()],
    ("role_unknown", "messages", {"messages": [U, {"role": "narrator", "content": "x"}]}, True),
    ("role_null", "messages", {"messages": [U, {"role": None, "content": "x"}]}, True),
    ("role_number", "messages", {"messages": [U, {"role": 5, "content": "x"}]}, True),
    ("role_missing", "messages", {"messages": [U, {"content": "x"}]}, True),
    ("content_missing", "messages", {"messages": [U, {"role": "assistant"}]}, True),
    ("turn_null", "messages", {"messages": [U, None]}, True),
    ("turn_string", "messages", {"messages": [U, "Hello"]}, True),
    ("turn_number", "messages", {"messages": [U, 7]}, True),
    ("turn_list", "messages", {"messages": [U, [A]]}, True),
    ("messages_null", "messages", {"messages": None}, True),
    ("messages_string", "messages", {"messages": "Hi there"}, True),
    ("messages_number", "messages", {"messages": 5}, True),
    ("messages_object", "messages", {"messages": {"role": "user"}}, True),
    ("messages_empty", "messages", {"messages": []}, True),
    ("no_assistant", "messages", {"messages": [U, U]}, True),
    ("last_turn_user", "messages", {"messages": [U, A, U]}, True),
    ("last_turn_system", "messages", {"messages": [U, A, {"role": "system", "content": "x"}]}, True),
    ("orphan_tool", "messages", {"messages": [U, {"role": "tool", "content": "r"}, A]}, True),
    ("sg_from_unknown", "sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, True),
    ("sg_from_null", "sharegpt", {"conversations": [{"from": None, "value": "x"}]}, True),
    ("sg_value_null", "sharegpt", {"conversations": [{"from": "human", "value": None}]}, True),
    ("sg_value_number", "sharegpt",
     {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": 4}]}, True),
    ("sg_value_empty", "sharegpt",
     {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}, True),
    ("sg_turn_null", "sharegpt", {"conversations": [{"from": "human", "value": "x"}, None]}, True),
    ("sg_null", "sharegpt", {"conversations": None}, True),
    ("sg_only_human", "sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, True),
    ("sg_bad_function_call", "sharegpt",
     {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{oops"}]}, True),
    *[(f"alpaca_instruction_{k}", "alpaca", {"instruction": v, "output": "y"}, True)
      for k, v in {"null": None, "empty": "", "number": 5, "list": ["a"], "object": {"x": 1}}.items()],
    *[(f"alpaca_output_{k}", "alpaca", {"instruction": "x", "output": v}, True)
      for k, v in {"null": None, "empty": " ", "number": 5.5, "bool": False}.items()],
    ("alpaca_input_number", "alpaca", {"instruction": "x", "input": 7, "output": "y"}, True),
    ("alpaca_system_list", "alpaca", {"instruction": "x", "output": "y", "system": ["s"]}, True),
    ("pc_prompt_null", "prompt_completion", {"prompt": None, "completion": "y"}, True),
    ("pc_completion_number", "prompt_completion", {"prompt": "x", "completion": 42}, True),
    ("pc_completion_empty_list", "prompt_completion", {"prompt": "x", "completion": []}, True),
    ("pc_completion_user_turn", "prompt_completion", {"prompt": "x", "completion": [U]}, True),
    ("pc_prompt_bad_role", "prompt_completion", {"prompt": [{"role": "x", "content": "y"}], "completion": "z"},
     True),
    *[(f"text_{k}", "text", {"text": v}, True)
      for k, v in {"null": None, "empty": "", "number": 5, "list": ["a"], "object": {"t": "x"}}.items()],
    ("unrecognised_keys", "text", {"foo": 1, "bar": 2}, True),
    ("empty_object", "alpaca", {}, True),
    ("preference_pair", "prompt_completion", {"prompt": "x", "chosen": "a", "rejected": "b"}, True),
    *[(f"json_{k}", "messages", v, True)
      for k, v in {"number": 42, "string": "hello", "null": None, "list": [1, 2], "bool": True}.items()],
    ("mixed_alpaca_in_messages", "messages", GOOD["alpaca"], False),
    ("mixed_text_in_messages", "messages", GOOD["text"], False),
    ("mixed_sharegpt_in_alpaca", "alpaca", GOOD["sharegpt"], False),
    ("mixed_messages_in_text", "text", GOOD["messages"], False),
    ("mixed_pc_in_sharegpt", "sharegpt", GOOD["prompt_completion"], False),
    ("huge_text", "text", {"text": "x" * 1_000_001}, True),
]


FILE_LEVEL_PROBLEMS = {"unrecognised_keys", "preference_pair"}


def _dump_jsonl(path: Path, records: list[Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _dump_json(path: Path, records: list[Any]) -> None:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")


def _dump_parquet(path: Path, records: list[Any]) -> None:
    pq.write_table(pa.Table.from_pylist(records), path)


def _arrow_can_hold(records: list[Any]) -> bool:
    if not all(isinstance(r, dict) and r for r in records) or any(len(json.dumps(r)) > 10_000 for r in records):
        return False
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowException, TypeError):  # mixed types in one column: Parquet cannot store this case
        return False
    # Columns are taken from the first row only, so a later row's extra key would silently vanish.
    return all(set(r) <= set(table.column_names) for r in records)


def _record_cases() -> list[Case]:
    cases = []
    writers = {"jsonl": _dump_jsonl, "json": _dump_json, "parquet": _dump_parquet}
    for name, layout, bad, may_be_alone in BAD_ROWS:
        modes = {"after_good": [GOOD[layout], bad]} | ({"alone": [bad]} if may_be_alone else {})
        for mode, records in modes.items():
            for ext, write in writers.items():
                if (ext == "parquet" and not _arrow_can_hold(records)) or (ext, mode) == ("json", "alone"):
                    continue  # Parquet cannot store it / alone in .json takes the same path as in .jsonl

                def build(tmp: Path, ext=ext, write=write, records=records) -> Path:
                    path = tmp / f"data.{ext}"
                    write(path, copy.deepcopy(records))
                    return path

                # A file whose rows have no known layout gets one file-level message listing its columns.
                cases.append(Case(f"{name}-{mode}-{ext}", build, "skip" if mode == "after_good" else "error",
                                  line=name not in FILE_LEVEL_PROBLEMS))
    return cases


# --- byte-level problems in text files ---------------------------------------------------------------------------

ROWS = [{"instruction": "Café?", "output": "Oui, café."}, {"instruction": "2+2", "output": "4"},
        {"instruction": "Hi", "output": "Hello"}]
TEXT = {
    "jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS),
    "json": json.dumps(ROWS, ensure_ascii=False, indent=2),
    "csv": "instruction,output\n" + "".join(f'"{r["instruction"]}","{r["output"]}"\n' for r in ROWS),
    "tsv": "instruction\toutput\n" + "".join(f'{r["instruction"]}\t{r["output"]}\n' for r in ROWS),
}


def _zip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data", data)
    return buffer.getvalue()


def _parquet_bytes() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buffer)
    return buffer.getvalue()


def _late_latin1(text: str) -> bytes:
    lines = text.encode("utf-8").split(b"\n")
    lines[-2] = lines[-2] + "é".encode("latin-1")
    return b"\n".join(lines)


# name → (bytes from the valid text, expected outcome, whether the error must name a line)
CORRUPTIONS: dict[str, tuple[Callable[[str], bytes], str, bool]] = {
    "empty": (lambda t: b"", "error", False),
    "whitespace": (lambda t: b"  \n\t\n   ", "error", False),
    "newlines": (lambda t: b"\n" * 50, "error", False),
    "bom_only": (lambda t: b"\xef\xbb\xbf", "error", False),
    "bom_whitespace": (lambda t: b"\xef\xbb\xbf \n \n", "error", False),
    "utf16": (lambda t: t.encode("utf-16"), "error", False),
    "utf16_be_bom": (lambda t: b"\xfe\xff" + t.encode("utf-16-be"), "error", False),
    "utf16_le_no_bom": (lambda t: t.encode("utf-16-le"), "error", False),
    "utf16_be_no_bom": (lambda t: t.encode("utf-16-be"), "error", False),
    "utf32": (lambda t: t.encode("utf-32"), "error", False),
    "latin1": (lambda t: t.encode("latin-1"), "error", True),
    "cp1252_quotes": (lambda t: t.replace("Hello", "\u201cHello\u201d").encode("cp1252"), "error", True),
    "latin1_late_line": (_late_latin1, "error", True),
    "gzip": (lambda t: gzip.compress(t.encode()), "error", False),
    "zip": (lambda t: _zip(t.encode()), "error", False),
    "parquet_inside": (lambda t: _parquet_bytes(), "error", False),
    "nul_bytes": (lambda t: t.encode().replace(b"Hi", b"H\x00i"), "either", False),
    "control_chars": (lambda t: t.replace("Hi", "H\x01\x02i").encode(), "either", False),
    "deep_nesting": (lambda t: b"[" * 100_000, "error", False),
    "deep_nesting_object": (lambda t: b'{"text": ' + b"[" * 100_000, "error", False),
    "huge_integer": (lambda t: b'{"text": "a", "n": ' + b"9" * 5000 + b"}\n", "error", False),
    "cr_line_endings": (lambda t: t.replace("\n", "\r").encode(), "either", False),
    "scalar_json": (lambda t: b"42", "error", False),
    "null_json": (lambda t: b"null", "error", False),
    "empty_list": (lambda t: b"[]", "error", False),
    "empty_object": (lambda t: b"{}", "error", False),
    "garbage_text": (lambda t: b"this is not a dataset\nat all\n", "error", False),
    "html": (lambda t: b"<!DOCTYPE html><html><body>404</body></html>\n", "error", False),
    **{f"truncated_{pct}": ((lambda t, pct=pct: t.encode()[: len(t.encode()) * pct // 100]), "either", False)
       for pct in (10, 35, 60, 90)},
    "truncated_last_byte": (lambda t: t.encode()[:-2], "either", False),
    "missing_closing_bracket": (lambda t: t.rstrip().rstrip("]").encode(), "either", False),
    "trailing_comma": (lambda t: t.replace("}\n]", "},\n]").replace('}\n', '},\n').encode(), "either", False),
    **{f"binary_junk_{seed}": ((lambda t, seed=seed: random.Random(seed).randbytes(2048)), "error", False)
       for seed in range(6)},
    **{f"high_bytes_{seed}": ((lambda t, seed=seed: bytes(random.Random(seed).randrange(128, 256)
                                                         for _ in range(300))), "error", False)
       for seed in range(3)},
}


ONLY_IN = {"missing_closing_bracket": {"json"}, "trailing_comma": {"json", "jsonl"}}
"""Corruptions that mean nothing for other file types."""
STILL_VALID_IN = {"control_chars": {"csv", "tsv"}, "cr_line_endings": {"json", "csv", "tsv"},
                  **{f"truncated_{pct}": {"csv", "tsv"} for pct in (10, 35, 60, 90)},
                  "truncated_last_byte": {"csv", "tsv"}}
"""Where a corruption can leave a valid file (a CSV cut between rows, CR line breaks in CSV or JSON)."""


def _byte_cases() -> list[Case]:
    cases = []
    for kind, text in TEXT.items():
        for name, (corrupt, expect, line) in CORRUPTIONS.items():
            if kind not in ONLY_IN.get(name, {kind}):
                continue
            if kind in STILL_VALID_IN.get(name, ()):
                expect = "any"
            def build(tmp: Path, kind=kind, text=text, corrupt=corrupt) -> Path:
                path = tmp / f"data.{kind}"
                path.write_bytes(corrupt(text))
                return path

            cases.append(Case(f"{name}-{kind}", build, expect, line))
    return cases


# --- tables, folders and paths -------------------------------------------------------------------------------


def _write(name: str, data: bytes | str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path
    return build


def _table_file(name: str, records: list[dict[str, Any]], kind: str, schema: Any = None,
                cut: float | None = None) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        path = tmp / name
        table = pa.Table.from_pylist(records, schema=schema)
        if kind == "parquet":
            pq.write_table(table, path)
        else:
            opener = pa.ipc.new_file if kind == "arrow" else pa.ipc.new_stream
            with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
                writer.write_table(table)
        if cut is not None:
            path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
        return path
    return build


def _folder(files: dict[str, bytes | str], dirs: tuple[str, ...] = ()) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        root = tmp / "dataset"
        root.mkdir()
        for d in dirs:
            (root / d).mkdir()
        for name, data in files.items():
            (root / name).write_bytes(data.encode() if isinstance(data, str) else data)
        return root
    return build


def _missing(name: str) -> Callable[[Path], Path]:
    return lambda tmp: tmp / name


STR_SCHEMA = pa.schema([("instruction", pa.string()), ("output", pa.string())])
JSONL_CHAT = json.dumps(GOOD["messages"]) + "\n"
JSONL_ALPACA = json.dumps(GOOD["alpaca"]) + "\n"
JSONL_SHAREGPT = json.dumps(GOOD["sharegpt"]) + "\n"
MESSAGES_CELL = json.dumps(GOOD["messages"]["messages"]).replace('"', '""')

OTHER_CASES = [
    Case("csv_header_only", _write("data.csv", "instruction,output\n"), "error"),
    Case("csv_header_then_blank_lines", _write("data.csv", "instruction,output\n\n\n"), "error"),
    Case("csv_unknown_columns", _write("data.csv", "foo,bar\n1,2\n"), "error"),
    Case("csv_ragged_long", _write("data.csv", "instruction,output\na,b\nc,d,e\n"), "skip"),
    Case("csv_ragged_short", _write("data.csv", "instruction,output\na,b\nc\n"), "skip"),
    Case("csv_all_ragged", _write("data.csv", "instruction,output\na,b,c\nd\n"), "error", line=True),
    Case("csv_unbalanced_quote_end", _write("data.csv", 'instruction,output\na,b\n"c,d\n'), "skip"),
    Case("csv_unbalanced_quote_mid", _write("data.csv", 'instruction,output\n"a,b\nc,d\ne,f\n'), "either"),
    Case("csv_semicolons", _write("data.csv", "instruction;output\na;b\n"), "error"),
    Case("csv_tabs", _write("data.csv", "instruction\toutput\na\tb\n"), "error"),
    Case("tsv_commas", _write("data.tsv", "instruction,output\na,b\n"), "error"),
    Case("csv_duplicate_header", _write("data.csv", "text,text\na,b\n"), "error"),
    Case("csv_empty_outputs", _write("data.csv", "instruction,output\na,\nb,\n"), "error", line=True),
    Case("csv_some_empty_outputs", _write("data.csv", "instruction,output\na,x\nb,\n"), "skip"),
    Case("csv_messages_bad_json", _write("data.csv", f'messages\n"{MESSAGES_CELL}"\n"[{{oops"\n'), "skip"),
    Case("csv_messages_wrong_shape", _write("data.csv", f'messages\n"{MESSAGES_CELL}"\n"[1, 2]"\n'), "skip"),
    Case("csv_messages_plain_text", _write("data.csv", "messages\nhello\n"), "error", line=True),
    Case("csv_quoted_newline_ragged", _write("data.csv", 'instruction,output\na,b\n"c\nd",e,f\n'), "skip"),
    Case("csv_huge_cell", _write("data.csv", "text\nok\n" + "x" * 1_000_001 + "\n"), "skip"),
    Case("parquet_empty_file", _write("data.parquet", b""), "error"),
    Case("parquet_junk", _write("data.parquet", random.Random(1).randbytes(500)), "error"),
    Case("parquet_text_inside", _write("data.parquet", "instruction,output\na,b\n"), "error"),
    Case("parquet_fake_magic", _write("data.parquet", b"PAR1" + b"\x00" * 100 + b"PAR1"), "error"),
    *[Case(f"parquet_truncated_{int(cut * 100)}", _table_file("data.parquet", ROWS, "parquet", cut=cut), "error")
      for cut in (0.1, 0.5, 0.9)],
    Case("parquet_unknown_columns", _table_file("data.parquet", [{"foo": 1}], "parquet"), "error"),
    Case("parquet_zero_rows", _table_file("data.parquet", [], "parquet", schema=STR_SCHEMA), "error"),
    Case("parquet_null_outputs", _table_file("data.parquet", [ROWS[0], {"instruction": "x", "output": None}],
                                             "parquet"), "skip"),
    Case("parquet_named_arrow", _table_file("data.arrow", ROWS, "parquet"), "error"),
    Case("arrow_empty_file", _write("data.arrow", b""), "error"),
    Case("arrow_junk", _write("data.arrow", random.Random(2).randbytes(500)), "error"),
    Case("arrow_text_inside", _write("data.arrow", JSONL_CHAT), "error"),
    *[Case(f"arrow_{kind}_truncated_{int(cut * 100)}", _table_file("data.arrow", ROWS, kind, cut=cut), "error")
      for kind in ("arrow", "stream") for cut in (0.2, 0.6)],
    Case("arrow_unknown_columns", _table_file("data.arrow", [{"foo": "x"}], "arrow"), "error"),
    Case("arrow_zero_rows", _table_file("data.arrow", [], "stream", schema=STR_SCHEMA), "error"),
    Case("arrow_named_parquet", _table_file("data.parquet", ROWS, "arrow"), "error"),
    Case("folder_empty", _folder({}), "error"),
    Case("folder_readme_only", _folder({"README.md": "# hi"}), "error"),
    Case("folder_subfolders_only", _folder({}, dirs=("train", "test")), "error"),
    Case("folder_hidden_only", _folder({".data.jsonl": JSONL_CHAT}), "error"),
    Case("folder_mixed_types", _folder({"a.jsonl": JSONL_CHAT, "b.csv": "text\nhi\n"}), "error"),
    Case("folder_mixed_layouts", _folder({"a.jsonl": JSONL_CHAT, "b.jsonl": JSONL_ALPACA}), "error"),
    Case("folder_good_and_empty", _folder({"a.jsonl": JSONL_CHAT, "b.jsonl": ""}), "error"),
    Case("folder_good_and_latin1", _folder({"a.jsonl": JSONL_CHAT, "b.jsonl": '{"text": "é"}'.encode("latin-1")}),
         "error", line=True),
    Case("folder_good_and_bad_rows", _folder({"a.jsonl": JSONL_CHAT, "b.jsonl": JSONL_CHAT + "{oops\n"}), "skip"),
    Case("folder_save_to_disk_broken", _folder({"state.json": "{not json", "dataset_info.json": "{}"}), "error"),
    Case("folder_save_to_disk_empty_state", _folder({"state.json": "{}"}), "error"),
    Case("missing_file", _missing("nope.jsonl"), "error"),
    Case("missing_folder", _missing("nope"), "error"),
    Case("txt_extension", _write("data.txt", JSONL_CHAT), "error"),
    Case("gz_extension", _write("data.jsonl.gz", gzip.compress(JSONL_CHAT.encode())), "error"),
    Case("no_extension", _write("data", JSONL_CHAT), "error"),
    Case("xlsx_extension", _write("data.xlsx", _zip(b"x")), "error"),
    Case("tool_rows_rejected_all", _write("data.jsonl", json.dumps({"messages": [
        U, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
        {"role": "tool", "content": "r"}, A]}) + "\n"), "error", line=True, kwargs=(("tool_messages", "reject"),)),
    Case("tool_rows_rejected_some", _write("data.jsonl", JSONL_SHAREGPT + json.dumps({"conversations": [
        {"from": "human", "value": "x"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "y"}]}) + "\n"), "skip",
        kwargs=(("tool_messages", "reject"),)),
    Case("many_leading_bad_lines", _write("data.jsonl", "{oops\n" * 10 + JSONL_CHAT), "error", line=True),
    Case("few_bad_lines_then_good", _write("data.jsonl", "{oops\n" * 3 + JSONL_CHAT), "skip"),
    Case("pretty_json_in_jsonl", _write("data.jsonl", json.dumps([GOOD["text"]] * 3, indent=2)), "error"),
    Case("unrecognised_rows_then_good", _write("data.jsonl", '{"foo": 1}\n' * 150 + JSONL_CHAT), "error"),
]

CASES = _record_cases() + _byte_cases() + OTHER_CASES
