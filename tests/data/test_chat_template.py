"""Gemma 4 chat templates (rendering, tools, thinking, the prefix property) and the bundled dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError

from slimtune.data.chat_template import GEMMA4_CHAT_TEMPLATE, GEMMA4_THINKING_CHAT_TEMPLATE
from slimtune.models.tokenizer_build import build_tokenizer

DATASET = Path(__file__).resolve().parents[2] / "slimtune" / "data" / "default_data.jsonl"
TEMPLATES = {"plain": GEMMA4_CHAT_TEMPLATE, "thinking": GEMMA4_THINKING_CHAT_TEMPLATE}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def render(tok, messages, template=GEMMA4_CHAT_TEMPLATE, **kwargs) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


TOOL_CHAT = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
        {"id": "b", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}},
    ]},
    {"role": "tool", "tool_call_id": "a", "content": "sunny"},
    {"role": "tool", "tool_call_id": "b", "name": "weather", "content": {"sky": "rain"}},
    {"role": "assistant", "content": "Sunny in Paris, rain in Rome."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]

THINKING_CHAT = [
    {"role": "system", "content": "<|think|>Be brief."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "Four."},
    {"role": "user", "content": "And 3 plus 3?"},
    {"role": "assistant", "thinking": "Three and three make six.", "content": "Six."},
]

MULTIMODAL_CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this? "}, {"type": "audio"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square and a beep."}]},
]


def test_system_and_multi_turn(tok):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert render(tok, messages, add_generation_prompt=True) == (
        "<bos><|turn>system\nYou are helpful.<turn|>\n<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n<|turn>user\nCapital of France?<turn|>\n<|turn>model\n"
    )
    assert not render(tok, messages).endswith("<|turn>model\n")
    # "model" is accepted as a role name too, and renders like "assistant".
    assert render(tok, [{"role": "model", "content": "x"}]) == render(tok, [{"role": "assistant", "content": "x"}])


def test_content_parts_become_processor_placeholders(tok):
    text = render(tok, MULTIMODAL_CHAT)
    assert text == ("<bos><|turn>user\n<|image|>What is this? <|audio|><turn|>\n"
                    "<|turn>model\nA red square and a beep.<turn|>\n")
    video = render(tok, [{"role": "user", "content": [{"type": "video"}]}])
    assert "<|video|>" in video
    with pytest.raises(TemplateError, match="Unsupported content part"):
        render(tok, [{"role": "user", "content": [{"type": "document"}]}])
    with pytest.raises(TemplateError, match="Unsupported role"):
        render(tok, [{"role": "developer", "content": "x"}])


def test_tool_calls_and_responses_stay_in_the_model_turn(tok):
    assert render(tok, TOOL_CHAT[:6]) == (
        "<bos><|turn>system\nYou can call tools.<turn|>\n<|turn>user\nWeather in Paris and Rome?<turn|>\n"
        '<|turn>model\n<|tool_call>call:weather{"city": "Paris"}<tool_call|>'
        '<|tool_call>call:weather{"city": "Rome"}<tool_call|>'
        '<|tool_response>response:weather{"value": "sunny"}<tool_response|>'
        '<|tool_response>response:weather{"sky": "rain"}<tool_response|>'
        "Sunny in Paris, rain in Rome.<turn|>\n"
    )
    # After a tool result the model continues its open turn: no new turn header is added.
    assert render(tok, TOOL_CHAT[:4], add_generation_prompt=True).endswith("<tool_response|>")
    # A user message after a tool result closes the model's turn first.
    closed = render(tok, TOOL_CHAT[:4] + [{"role": "user", "content": "?"}])
    assert closed.endswith("<tool_response|><turn|>\n<|turn>user\n?<turn|>\n")
    with pytest.raises(TemplateError, match="tool message"):
        render(tok, [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


def test_thinking_template_renders_reasoning_and_plain_template_drops_it(tok):
    thinking = render(tok, THINKING_CHAT, GEMMA4_THINKING_CHAT_TEMPLATE)
    assert thinking == (
        "<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\nWhat is 2 plus 2?<turn|>\n"
        "<|turn>model\n<|channel>thought\nTwo and two make four.<channel|>Four.<turn|>\n"
        "<|turn>user\nAnd 3 plus 3?<turn|>\n"
        "<|turn>model\n<|channel>thought\nThree and three make six.<channel|>Six.<turn|>\n"
    )
    plain = render(tok, THINKING_CHAT, enable_thinking=True)
    assert "<|channel>" not in plain and "make four" not in plain and "<|turn>model\nFour.<turn|>" in plain


def test_enable_thinking_adds_the_think_token(tok):
    no_system = THINKING_CHAT[1:3]
    on = render(tok, no_system, GEMMA4_THINKING_CHAT_TEMPLATE, enable_thinking=True)
    assert on.startswith("<bos><|turn>system\n<|think|><turn|>\n<|turn>user\n")
    off = render(tok, no_system, GEMMA4_THINKING_CHAT_TEMPLATE)
    assert "<|think|>" not in off
    with_system = [{"role": "system", "content": "Be brief."}, *no_system]
    assert render(tok, with_system, GEMMA4_THINKING_CHAT_TEMPLATE, enable_thinking=True).startswith(
        "<bos><|turn>system\n<|think|>Be brief.<turn|>\n")
    assert render(tok, THINKING_CHAT, GEMMA4_THINKING_CHAT_TEMPLATE, enable_thinking=True).count("<|think|>") == 1


def _dataset_rows() -> list[dict]:
    return [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendering_a_prefix_gives_a_string_prefix(tok, name):
    """The trainer finds each message's span by rendering messages[:k]; that must be a prefix of the whole."""
    conversations = [TOOL_CHAT, THINKING_CHAT, MULTIMODAL_CHAT] + [row["messages"] for row in _dataset_rows()[::40]]
    for messages in conversations:
        for kwargs in ({}, {"enable_thinking": True}):
            full = render(tok, messages, TEMPLATES[name], **kwargs)
            previous = ""
            for k in range(1, len(messages) + 1):
                part = render(tok, messages[:k], TEMPLATES[name], **kwargs)
                assert full.startswith(part), (name, k, part)
                assert len(part) > len(previous)  # every message adds text
                previous = part


def test_chat_renders_to_ids_with_atomic_control_tokens(tok):
    ids = tok.apply_chat_template(TOOL_CHAT, tokenize=True, return_dict=True)["input_ids"]
    text = render(tok, TOOL_CHAT)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    for token in ("<|turn>", "<turn|>", "<|tool_call>", "<|tool_response>"):
        assert ids.count(tok.convert_tokens_to_ids(token)) == text.count(token)
    assert tok.decode(ids) == text


# ---------------------------------------------------------------- the bundled dataset


def test_bundled_dataset_rows_end_with_a_short_deterministic_answer(tok):
    rows = _dataset_rows()
    assert 250 <= len(rows) <= 400
    answers: dict[str, str] = {}
    n_system = n_multi = 0
    for row in rows:
        messages = row["messages"]
        roles = [m["role"] for m in messages]
        assert set(roles) <= {"system", "user", "assistant"} and roles[-1] == "assistant"
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
        n_system += roles[0] == "system"
        n_multi += roles.count("user") > 1
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            assert len(tok(message["content"], add_special_tokens=False).input_ids) <= 20
            context = json.dumps(messages[:k])
            # The answer is a function of the conversation so far: the same context never gets two answers.
            assert answers.setdefault(context, message["content"]) == message["content"], context
    assert n_system >= 30 and n_multi >= 10
