"""Reading every supported file type and folder into normalised rows (slimtune/data/readers.py, _files.py)."""

from __future__ import annotations

import json
import logging
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slimtune.data.readers import DatasetLoad, SkipInfo, load_records, summarize_dataset
from slimtune.errors import ConfigError, DataError

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
CHAT_ROW = CHAT  # OpenAI rows come out as they went in
ALPACA = {"instruction": "Add", "input": "2 and 2", "output": "4"}
ALPACA_ROW = {"messages": [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_jsonl_reads_rows_and_skips_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n{broken\n" + json.dumps(CHAT) + "\n", encoding="utf-8")
    load = load_records(path)
    assert isinstance(load, DatasetLoad)
    assert (load.format, load.rows, load.n_read, load.n_skipped) == ("messages", [CHAT_ROW] * 2, 3, 1)
    assert load.skipped[0].location == "data.jsonl:3" and "invalid JSON" in load.skipped[0].reason
    assert load.columns == ["messages"] and load.source == str(path)


def test_ndjson_is_json_lines(tmp_path):
    assert load_records(write_jsonl(tmp_path / "data.ndjson", [CHAT])).rows == [CHAT_ROW]


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(CHAT) + "\r\n").encode() * 2)
    assert load_records(path).rows == [CHAT_ROW] * 2
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfinstruction,output\r\nHi,Hello!\r\n")
    assert load_records(csv_path).columns == ["instruction", "output"]


@pytest.mark.parametrize("layout", ["list", "wrapped", "single", "lines"])
def test_json_layouts(tmp_path, layout):
    path = tmp_path / "data.json"
    docs = {"list": [ALPACA, ALPACA], "wrapped": {"version": 2, "data": [ALPACA, ALPACA]}, "single": ALPACA}
    if layout == "lines":  # JSON Lines saved as .json
        path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n", encoding="utf-8")
    else:
        path.write_text(json.dumps(docs[layout], indent=2), encoding="utf-8")
    load = load_records(path)
    assert load.format == "alpaca" and load.rows == [ALPACA_ROW] * (1 if layout == "single" else 2)


def test_json_locations_name_item_and_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": ""},\n  {"text": "b"}\n]', encoding="utf-8")
    load = load_records(path)
    assert load.skipped == [SkipInfo("data.json:item 2 (line 3)", "'text' is empty")]


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.json:3: invalid JSON"):
        load_records(path)


def test_json_duplicate_key_uses_the_list_json_keeps(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"data": 1, "data": [{"text": "a"}, {"text": "b"}]}', encoding="utf-8")
    assert load_records(path).rows == [{"text": "a"}, {"text": "b"}]


def test_json_with_several_list_fields_is_refused(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"train": [ALPACA], "test": [ALPACA]}), encoding="utf-8")
    with pytest.raises(DataError, match="several list fields"):
        load_records(path)


def test_csv_with_embedded_newlines_quotes_and_json_cells(tmp_path):
    path = tmp_path / "data.csv"
    messages = json.dumps(CHAT["messages"]).replace('"', '""')
    path.write_text('id,messages\n1,"' + messages + '"\n2,"' + messages + '"\n', encoding="utf-8")
    assert load_records(path).rows == [CHAT_ROW] * 2
    alpaca = tmp_path / "alpaca.csv"
    alpaca.write_text('instruction,output\n"Write a ""poem""\nin two lines","Roses,\nviolets"\n', encoding="utf-8")
    load = load_records(alpaca)
    assert load.rows[0]["messages"][0]["content"] == 'Write a "poem"\nin two lines'
    assert load.rows[0]["messages"][1]["content"] == "Roses,\nviolets"


def test_csv_ragged_rows_are_skipped_with_row_location(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\nf,g\n", encoding="utf-8")
    load = load_records(path)
    assert load.n_skipped == 1 and load.skipped[0].location == "data.csv:row 2"


def test_tsv(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("question\tanswer\nWhat?\tThat.\n", encoding="utf-8")
    assert load_records(path).rows == [{"messages": [{"role": "user", "content": "What?"},
                                                     {"role": "assistant", "content": "That."}]}]


def test_parquet_with_nested_messages_and_nulls(tmp_path):
    # Arrow gives every turn every struct field, so the first turn gets tool_calls=None: it must vanish.
    call = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    records = [{"messages": [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "", "tool_calls": call},
                             {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "Done"}]},
               {"messages": None}]
    load = load_records(write_parquet(tmp_path / "data.parquet", records))
    assert load.rows[0]["messages"][0] == {"role": "user", "content": "Hi"}
    assert load.rows[0]["messages"][1]["tool_calls"] == call
    assert load.skipped == [SkipInfo("data.parquet:row 2", "'messages' is null, expected a list of turns")]


@pytest.mark.parametrize("kind", ["file", "stream"])
def test_arrow_ipc_file_and_stream(tmp_path, kind):
    table = pa.Table.from_pylist([ALPACA, ALPACA])
    path = tmp_path / "data.arrow"
    opener = pa.ipc.new_file if kind == "file" else pa.ipc.new_stream
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        writer.write_table(table)
    assert load_records(path).rows == [ALPACA_ROW] * 2


def test_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([ALPACA, ALPACA]).save_to_disk(str(tmp_path / "ds"))
    load = load_records(tmp_path / "ds")
    assert load.rows == [ALPACA_ROW] * 2 and load.columns == ["instruction", "input", "output"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([CHAT]),
                          "test": datasets.Dataset.from_list([ALPACA])}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd").rows == [CHAT_ROW]


def test_save_to_disk_folder_without_datasets(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_records(tmp_path / "ds")


def test_folder_is_read_in_name_order(tmp_path, caplog):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first"}])
    (tmp_path / "README.md").write_text("# about")
    with caplog.at_level(logging.WARNING):
        load = load_records(tmp_path)
    assert load.rows == [{"text": "first"}, {"text": "second"}]
    assert "README.md" in caplog.text


def test_folder_with_mixed_file_types_or_formats_is_refused(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [CHAT])
    (tmp_path / "b.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"mixes file types: a\.jsonl \(jsonl\), b\.csv \(csv\)"):
        load_records(tmp_path)
    (tmp_path / "b.csv").unlink()
    write_jsonl(tmp_path / "b.jsonl", [ALPACA])
    with pytest.raises(DataError, match=r"a\.jsonl:1 is messages but b\.jsonl:1 is alpaca"):
        load_records(tmp_path)


def test_format_mismatch_within_a_file_is_a_counted_skip(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [ALPACA, CHAT, ALPACA])
    load = load_records(path)
    assert load.format == "alpaca" and load.n_skipped == 1
    assert "messages format" in load.skipped[0].reason and "alpaca format" in load.skipped[0].reason


def test_first_invalid_row_does_not_decide_the_format(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": ""}, CHAT])
    assert load_records(path).format == "messages"


def test_tool_messages_reject_is_a_counted_skip(tmp_path):
    tool_chat = {"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
                              {"role": "tool", "content": "y"}, {"role": "assistant", "content": "z"}]}
    path = write_jsonl(tmp_path / "data.jsonl", [CHAT, tool_chat])
    assert load_records(path).n_skipped == 0
    load = load_records(path, tool_messages="reject")
    assert load.n_skipped == 1 and "tool_messages='reject'" in load.skipped[0].reason


def test_skip_examples_are_capped_but_all_counted(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [CHAT] + [{"text": 1}] * 9)
    load = load_records(path, max_skip_examples=2)
    assert load.n_skipped == 9 and len(load.skipped) == 2 and load.n_read == 10


def test_huge_rows_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "ok"}, {"text": "x" * 1_000_001}])
    load = load_records(path)
    assert load.n_skipped == 1 and "over the 1,000,000 limit" in load.skipped[0].reason
    assert load_records(path, max_row_chars=2_000_000).n_skipped == 0


def test_nothing_fits_lists_columns_and_layouts(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("foo,bar\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}: no supported format; columns found: ['foo', 'bar']. Expected "
                                     "one of: messages (OpenAI), conversations (ShareGPT), instruction/output "
                                     "(Alpaca), prompt/completion, text.")


def test_unrecognised_rows_stop_early(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"foo": i} for i in range(150)] + [{"text": "late"}])
    with pytest.raises(DataError, match="no supported format"):
        load_records(path)


def test_all_rows_invalid_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"role": "user", "content": "x"}]}] * 3)
    with pytest.raises(DataError, match=r"no usable rows; all 3 rows were skipped \(data\.jsonl:1: no assistant"):
        load_records(path)


def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [CHAT])
    with pytest.raises(ConfigError, match="tool_messages"):
        load_records(path, tool_messages="drop")
    with pytest.raises(ConfigError, match="max_skip_examples"):
        load_records(path, max_skip_examples=-1)


def test_summarize_dataset_is_json_serialisable(tmp_path):
    # Every content is a parts list: Parquet needs one type per column.
    user = {"role": "user", "content": [{"type": "image", "image": {"bytes": b"\x89PNG"}},
                                        {"type": "text", "text": "y" * 5000}]}
    reply = {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}
    records = [{"messages": [user, reply]}] * 3 + [{"messages": None}]
    summary = summarize_dataset(write_parquet(tmp_path / "data.parquet", records), n_preview=2)
    json.dumps(summary)  # must not raise
    assert (summary["format"], summary["n_rows"], summary["n_read"], summary["n_skipped"]) == ("messages", 3, 4, 1)
    assert summary["skipped"][0]["location"] == "data.parquet:row 4" and len(summary["preview"]) == 2
    parts = summary["preview"][0]["messages"][0]["content"]
    assert parts[0]["image"]["bytes"] == "<4 bytes>" and parts[1]["text"].endswith("(1,000 more characters)")
