"""Hundreds of generated malformed datasets: each must give a DataError naming the file, or counted skips.

Every case builds its input under ``tmp_path`` and loads it. The contract checked for all of them:

* either `load_records` raises `DataError` whose message names the file (and the line or row, where the case
  says the problem sits on one), or it returns rows with ``n_skipped > 0`` whose first `SkipInfo` has a
  ``file:line`` / ``file:row N`` / ``file:item N (line M)`` location;
* no other exception type, ever (one would fail the test with its traceback).

A second, smaller set holds awkward but valid files (BOMs, CRLF, quoted newlines) that must load cleanly.
"""

from __future__ import annotations

import json

import pytest
from malformed_cases import CASES, LOCATION, NAMES_LINE, ROWS, TEXT

from slimtune.data.readers import load_records
from slimtune.errors import DataError


def test_enough_cases_are_generated():
    assert len(CASES) >= 200
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def case_root(tmp_path_factory):
    # One folder for the module, a subfolder per case: pytest's per-test tmp_path costs more than the loads.
    return tmp_path_factory.mktemp("malformed")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_gives_data_error_or_located_skips(case_root, case):
    folder = case_root / case.id
    folder.mkdir()
    path = case.build(folder)
    try:
        load = load_records(path, **dict(case.kwargs))
    except DataError as err:
        message = str(err)
        assert case.expect in ("error", "either", "any"), f"expected skipped rows, got DataError: {message}"
        assert path.name in message, message
        if case.line:
            assert NAMES_LINE.search(message), message
        return
    assert case.expect in ("skip", "either", "any"), f"expected a DataError, got {load.n_read} rows read"
    if case.expect == "any" and load.n_skipped == 0:
        return
    assert load.n_skipped > 0 and load.skipped, "malformed input loaded without any skipped row"
    assert LOCATION.match(load.skipped[0].location), load.skipped[0].location
    assert load.n_read == len(load.rows) + load.n_skipped


# --- awkward but valid files ----------------------------------------------------------------------------------

ALPACA_ROWS = [{"messages": [{"role": "user", "content": r["instruction"]},
                             {"role": "assistant", "content": r["output"]}]} for r in ROWS]
VALID = {
    "jsonl_bom": ("data.jsonl", b"\xef\xbb\xbf" + TEXT["jsonl"].encode()),
    "jsonl_crlf": ("data.jsonl", TEXT["jsonl"].replace("\n", "\r\n").encode()),
    "jsonl_blank_lines": ("data.jsonl", ("\n\n" + TEXT["jsonl"].replace("\n", "\n\n  \n")).encode()),
    "jsonl_named_json": ("data.json", TEXT["jsonl"].encode()),
    "json_bom": ("data.json", b"\xef\xbb\xbf" + TEXT["json"].encode()),
    "json_wrapped": ("data.json", json.dumps({"meta": {"n": 3}, "data": ROWS}).encode()),
    "csv_bom_crlf": ("data.csv", b"\xef\xbb\xbf" + TEXT["csv"].replace("\n", "\r\n").encode()),
    "csv_trailing_unnamed_column": ("data.csv", TEXT["csv"].replace("output\n", "output,\n")
                                    .replace('"\n', '",\n').encode()),
    "tsv_bom": ("data.tsv", b"\xef\xbb\xbf" + TEXT["tsv"].encode()),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_awkward_but_valid_files_load_cleanly(tmp_path, name):
    filename, data = VALID[name]
    (tmp_path / filename).write_bytes(data)
    load = load_records(tmp_path / filename)
    assert (load.rows, load.n_skipped) == (ALPACA_ROWS, 0)


def test_json_lines_with_unicode_line_separator_inside_strings(tmp_path):
    # U+2028 is legal inside a JSON string; splitting JSON Lines on it would break the row in two.
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + json.dumps({"text": "c"}) + "\n",
                    encoding="utf-8")
    assert load_records(path).rows == [{"text": "a\u2028b"}, {"text": "c"}]


def test_csv_with_quoted_newlines_quotes_and_separators(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\n"Line one\nLine ""two"", with comma","A\r\nB"\n', encoding="utf-8")
    load = load_records(path)
    assert load.rows[0]["messages"][0]["content"] == 'Line one\nLine "two", with comma'
    assert load.rows[0]["messages"][1]["content"] == "A\r\nB"
