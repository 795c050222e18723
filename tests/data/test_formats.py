"""Layout detection and normalisation of single rows (slimtune/data/formats.py)."""

from __future__ import annotations

import pytest

from slimtune.data.describe import describe
from slimtune.data.formats import (
    FORMATS,
    detect_format,
    layout_hint,
    normalize_record,
    text_size,
)
from slimtune.errors import ConfigError, DataError

USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}


@pytest.mark.parametrize("record, expected", [
    ({"messages": [USER, ASSISTANT]}, "messages"),
    ({"conversations": [USER, ASSISTANT]}, "messages"),  # role/content under the ShareGPT key
    ({"conversation": [USER, ASSISTANT]}, "messages"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt"),
    ({"messages": [{"from": "human", "value": "hi"}]}, "sharegpt"),
    ({"conversations": "garbage"}, "sharegpt"),  # layout by key; the value is checked when normalising
    ({"messages": None}, "messages"),
    ({"instruction": "a", "output": "b"}, "alpaca"),
    ({"instruction": "a", "input": "", "output": "b", "text": "rendered"}, "alpaca"),  # original Alpaca columns
    ({"question": "a", "answer": "b"}, "alpaca"),
    ({"query": "a", "response": "b"}, "alpaca"),
    ({"instruction": "a", "context": "c", "response": "b"}, "alpaca"),  # Dolly
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"prompt": "a", "response": "b"}, "prompt_completion"),
    ({"text": "hello"}, "text"),
    ({"messages": [USER, ASSISTANT], "text": "rendered"}, "messages"),
    ({" Instruction ": "a", "OUTPUT": "b"}, "alpaca"),  # CSV headers: case and spaces ignored
    ({"foo": 1}, None),
    ({"prompt": "a", "chosen": "b", "rejected": "c"}, None),
    ({}, None),
    (["not", "a", "mapping"], None),
    ("text", None),
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_openai_messages_keep_extras_and_parts():
    image = {"type": "image", "image": "cat.png"}
    record = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat.", "reasoning_content": "whiskers"},
    ]}
    row = normalize_record(record, "messages")
    assert row["messages"][1]["content"][0] is image  # media parts pass through untouched
    assert row["messages"][2] == {"role": "assistant", "content": "A cat.", "reasoning_content": "whiskers"}


def test_role_aliases_and_null_extras_dropped():
    record = {"messages": [{"role": "Human", "content": "hi", "tool_calls": None},
                           {"role": "model", "content": "hello", "name": None}]}
    assert normalize_record(record, "messages") == {"messages": [{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "hello"}]}


def test_tool_calls_allow_empty_content_and_tool_policy():
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]
    record = {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": call},
                           {"role": "tool", "content": "4"}, ASSISTANT]}
    row = normalize_record(record, "messages")
    assert row["messages"][1] == {"role": "assistant", "content": "", "tool_calls": call}
    with pytest.raises(DataError, match="tool_messages='reject'"):
        normalize_record(record, "messages", tool_messages="reject")


def test_tool_turn_must_follow_a_call():
    with pytest.raises(DataError, match="turn 2 is a tool result"):
        normalize_record({"messages": [USER, {"role": "tool", "content": "4"}, ASSISTANT]}, "messages")


def test_sharegpt_roles_system_and_function_call():
    record = {"system": "You are terse.", "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 °C."},
    ]}
    messages = normalize_record(record, "sharegpt")["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"] == [{"type": "function",
                                          "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    with pytest.raises(DataError, match="tool_messages='reject'"):
        normalize_record(record, "sharegpt", tool_messages="reject")


@pytest.mark.parametrize("value", ["not json", '{"arguments": {}}', "[]", "42"])
def test_sharegpt_bad_function_call(value):
    record = {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": value}]}
    with pytest.raises(DataError, match="function_call"):
        normalize_record(record, "sharegpt")


def test_alpaca_with_input_and_system():
    row = normalize_record({"instruction": "Translate", "input": "chat", "output": "cat", "system": "S"}, "alpaca")
    assert row == {"messages": [{"role": "system", "content": "S"},
                                {"role": "user", "content": "Translate\n\nchat"},
                                {"role": "assistant", "content": "cat"}]}
    # An empty (CSV) or null (Parquet) input is simply absent.
    for empty in ("", None):
        row = normalize_record({"instruction": "Hi", "input": empty, "output": "Hello"}, "alpaca")
        assert row["messages"][0] == {"role": "user", "content": "Hi"}


def test_prompt_completion_strings_and_lists():
    assert normalize_record({"prompt": "Hi", "completion": "Hello"}, "prompt_completion") == {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    row = normalize_record({"prompt": [USER], "completion": [ASSISTANT]}, "prompt_completion")
    assert row == {"messages": [USER, ASSISTANT]}
    with pytest.raises(DataError, match="turn 2 has unknown role"):
        normalize_record({"prompt": [USER], "completion": [{"role": "bot", "content": "x"}]}, "prompt_completion")


def test_text():
    assert normalize_record({"text": "hello"}, "text") == {"text": "hello"}


EMPTY_REPLY = r"turn 2 \(assistant\) has empty content"


@pytest.mark.parametrize("record, fmt, reason", [
    ({"messages": [USER, {"role": "assistant", "content": ""}]}, "messages", EMPTY_REPLY),
    ({"messages": [USER, {"role": "assistant", "content": None}]}, "messages", EMPTY_REPLY),
    ({"messages": [USER, {"role": "assistant"}]}, "messages", r"turn 2 \(assistant\) has no content"),
    ({"messages": [USER, {"role": "assistant", "content": 42}]}, "messages", r"a number \(42\)"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "text"}]}]}, "messages", "'text' is null"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "pdf"}]}]}, "messages", "type 'pdf'"),
    ({"messages": [USER, {"role": "assistant", "content": [{"text": "x"}]}]}, "messages", "part 1 has no 'type'"),
    ({"messages": [USER, {"role": "assistant", "content": ["hi"]}]}, "messages", "part 1 is a string"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": " "}]}]}, "messages",
     "empty content"),
    ({"messages": [USER, {"role": "narrator", "content": "x"}]}, "messages", "unknown role 'narrator'"),
    ({"messages": [USER, {"content": "x"}]}, "messages", "turn 2 'role' is missing"),
    ({"messages": [USER, None]}, "messages", "turn 2 is null"),
    ({"messages": [USER, "hi"]}, "messages", "turn 2 is a string"),
    ({"messages": [USER]}, "messages", "no assistant turn"),
    ({"messages": [USER, ASSISTANT, USER]}, "messages", "last turn is 'user'"),
    ({"messages": []}, "messages", "'messages' is empty"),
    ({"messages": "[oops"}, "messages", "CSV or Parquet cell"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "unknown from 'alien'"),
    ({"conversations": [{"from": "human", "value": None}]}, "sharegpt", "'value' is null"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}, "sharegpt",
     "empty content"),
    ({"instruction": "", "output": "y"}, "alpaca", "'instruction' is empty"),
    ({"instruction": "x", "output": 7}, "alpaca", "'output' is a number"),
    ({"instruction": "x", "input": 3, "output": "y"}, "alpaca", "'input' is a number"),
    ({"prompt": None, "completion": "y"}, "prompt_completion", "'prompt' is null"),
    ({"text": ["a"]}, "text", "'text' is a list"),
    ({"text": "  "}, "text", "'text' is empty"),
    ({"other": 1}, "text", "missing 'text'"),
    (["x"], "text", "row is a list"),
])
def test_bad_rows_raise_data_error_with_reason(record, fmt, reason):
    with pytest.raises(DataError, match=reason):
        normalize_record(record, fmt)


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="format='csv'"):
        normalize_record({"text": "x"}, "csv")
    with pytest.raises(ConfigError, match="tool_messages='drop'"):
        normalize_record({"text": "x"}, "text", tool_messages="drop")


def test_text_size_counts_text_only():
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "x" * 100},
                                                     {"type": "text", "text": "abc"}]},
                        {"role": "assistant", "content": "de"}]}
    assert text_size(row) == 5
    assert text_size({"text": "hello"}) == 5


def test_layout_hint_and_describe():
    assert "preference" in layout_hint(["prompt", "chosen", "rejected"])
    assert "no 'instruction'" in layout_hint(["output"])
    assert layout_hint(["foo"]) == ""
    assert describe(None) == "null" and describe(True) == "a boolean (True)" and describe({}) == "an object"
    assert set(FORMATS) == {"messages", "sharegpt", "alpaca", "prompt_completion", "text"}
