"""Recognise which dataset layout a row uses and turn it into slimtune's chat or text shape.

Every accepted row becomes ``{"messages": [{"role", "content", ...}, ...]}`` (roles ``system``, ``user``,
``assistant``, ``tool``) or ``{"text": str}``. Top-level keys are matched ignoring case and surrounding spaces,
so a CSV header ``Instruction `` counts as ``instruction``. Accepted layouts, tried in this order:

* **messages** (OpenAI) and **sharegpt**: a list of turns under ``messages``, ``conversations`` or
  ``conversation``; the turns' keys pick the layout. OpenAI turns are ``{"role", "content"}``, where content
  is a string or a list of parts (``text``, ``image``, ``image_url``, ``audio``, ``input_audio``, ``video``);
  extra turn keys (``tool_calls``, ``reasoning_content``, ``name``, ...) are kept and media parts pass through
  untouched. ShareGPT turns are ``{"from", "value"}`` with ``from`` mapped by `ROLE_ALIASES`; a
  ``function_call`` turn (JSON ``{"name", "arguments"}``) becomes an assistant turn with ``tool_calls``, and an
  optional top-level ``system`` becomes the first turn.
* **prompt_completion**: ``prompt`` + ``completion`` (or ``response``), each a string (one user / one
  assistant turn) or a list of OpenAI turns; optional ``system``.
* **alpaca**: ``instruction`` (or ``question``/``query``) + ``output`` (or ``response``/``answer``), optional
  ``input`` (or ``context``, appended to the instruction after a blank line) and ``system``.
* Chat rows may carry their media in top-level ``image``/``images`` and ``audio``/``audios`` columns
  (see `slimtune.data.media_columns`).
* **text**: ``text``, a string trained on in full. Alpaca files that also carry a rendered ``text`` column are
  Alpaca, because Alpaca is tried first.

A chat row is rejected (`DataError` with the reason) when a turn is null, has an unknown role, or has empty or
non-string content that is not a valid parts list (an assistant turn with ``tool_calls`` may be empty); when a
tool result does not follow a tool call; when no turn is the assistant's (nothing to learn); or when the last
turn is not the assistant's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from slimtune.data.describe import describe
from slimtune.data.media_columns import attach_media_columns, reject_media_columns
from slimtune.errors import ConfigError, DataError

FORMATS: tuple[str, ...] = ("messages", "sharegpt", "prompt_completion", "alpaca", "text")
"""Format names `detect_format` returns, in the order they are tried."""

EXPECTED_LAYOUTS = ("messages (OpenAI), conversations (ShareGPT), instruction/output (Alpaca), "
                    "prompt/completion, text")
"""Human-readable list of accepted layouts, used in error messages."""

TOOL_MESSAGE_POLICIES: tuple[str, ...] = ("keep", "reject")
"""Values of ``tool_messages``: keep tool/function turns, or skip rows that contain them."""

CHAT_KEYS = ("messages", "conversations", "conversation")
INSTRUCTION_KEYS = ("instruction", "question", "query")
OUTPUT_KEYS = ("output", "response", "answer")
INPUT_KEYS = ("input", "context")
COMPLETION_KEYS = ("completion", "response")

ROLE_ALIASES: dict[str, str] = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
"""Accepted role names (OpenAI ``role`` or ShareGPT ``from``, any case) and the role each becomes."""

PART_TYPES = frozenset({"text", "image", "image_url", "audio", "input_audio", "video"})
"""Content part types the Gemma 4 chat template can render."""

_FUNCTION_CALL = "function_call"  # ShareGPT speaker whose value is a JSON tool call made by the assistant
_MISSING = object()


def detect_format(record: Mapping[str, Any]) -> str | None:
    """Name the layout a row uses, judging by its keys only (values are checked by `normalize_record`).

    Args:
        record: one raw row, e.g. a parsed JSON line or a CSV row as a dict.

    Returns:
        One of `FORMATS`, or None when the row matches no supported layout (or is not a mapping).

    Example:
        >>> detect_format({"instruction": "Add 2 and 2", "output": "4"})
        'alpaca'
    """
    if not isinstance(record, Mapping):
        return None
    fields = _fields(record)
    chat = _first(fields, CHAT_KEYS)
    if chat is not None:
        return _chat_flavour(*chat)
    if "prompt" in fields and _first(fields, COMPLETION_KEYS) is not None:
        return "prompt_completion"
    if _first(fields, INSTRUCTION_KEYS) is not None and _first(fields, OUTPUT_KEYS) is not None:
        return "alpaca"
    if "text" in fields:
        return "text"
    return None


def normalize_record(record: Mapping[str, Any], fmt: str, *, tool_messages: str = "keep") -> dict[str, Any]:
    """Convert one row of layout `fmt` into ``{"messages": [...]}`` or ``{"text": str}``.

    Args:
        record: one raw row.
        fmt: its layout, one of `FORMATS` (usually from `detect_format`).
        tool_messages: ``"keep"`` keeps tool/function turns; ``"reject"`` refuses rows that have them.

    Returns:
        The normalised row. Non-text content parts and extra turn keys are passed through unchanged
        (null-valued extras, which Parquet/Arrow add for absent struct fields, are dropped).

    Raises:
        DataError: the row cannot be used; the message is the reason, without a file location. Bad media
            columns raise its subclass ``MediaColumnError`` (see slimtune.data.media_columns).
        ConfigError: `fmt` or `tool_messages` is not a supported value.

    Example:
        >>> normalize_record({"prompt": "Hi", "completion": "Hello!"}, "prompt_completion")
        {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}]}
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not supported; use one of {list(FORMATS)}.")
    if tool_messages not in TOOL_MESSAGE_POLICIES:
        raise ConfigError(f"tool_messages={tool_messages!r} is not supported; use 'keep' or 'reject'.")
    if not isinstance(record, Mapping):
        raise DataError(f"row is {describe(record)}, expected an object with named fields")
    fields = _fields(record)
    if fmt == "text":
        reject_media_columns(fields)
        return {"text": _required_text(fields, ("text",))}
    messages = _CHAT_BUILDERS[fmt](fields)
    if fmt != "messages":  # OpenAI rows carry their system prompt as a turn already
        system = _optional_text(fields, ("system",))
        if system is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    attach_media_columns(fields, messages)  # image/images, audio/audios columns → media parts
    _check_conversation(messages, tool_messages)
    return {"messages": messages}


def text_size(row: Mapping[str, Any]) -> int:
    """Count the characters of text in a normalised row (media parts and tool-call arguments excluded)."""
    if "text" in row:
        return len(row["text"])
    total = 0
    for message in row["messages"]:
        content = message["content"]
        if isinstance(content, str):
            total += len(content)
        else:
            total += sum(len(part["text"]) for part in content if part.get("type") == "text")
    return total


def layout_hint(columns: Sequence[str]) -> str:
    """A sentence that explains why columns that almost fit a layout do not, or "" when nothing is close."""
    names = {str(c).strip().lower() for c in columns}
    if {"chosen", "rejected"} <= names:
        return (" These look like preference (chosen/rejected) pairs; supervised fine-tuning needs one "
                "reply per row (e.g. rename 'chosen' to 'completion' and drop 'rejected').")
    if names & set(OUTPUT_KEYS) and not names & set(INSTRUCTION_KEYS):
        return " Found an answer column but no 'instruction' (or 'question'/'query') column."
    if names & set(INSTRUCTION_KEYS):
        return " Found an 'instruction'-style column but no 'output' (or 'response'/'answer') column."
    if "prompt" in names:
        return " Found 'prompt' but no 'completion' (or 'response') column."
    return ""


# --- key lookup ------------------------------------------------------------------------------------------------


def _fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """Lower-cased, stripped key → value; the first spelling wins if two keys collide."""
    fields: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(key, str):
            fields.setdefault(key.strip().lower(), value)
    return fields


def _first(fields: Mapping[str, Any], names: Sequence[str]) -> tuple[str, Any] | None:
    for name in names:
        if name in fields:
            return name, fields[name]
    return None


def _chat_flavour(key: str, turns: Any) -> str:
    # The turn keys decide, because both layouts appear under all three names in published datasets.
    if isinstance(turns, (list, tuple)):
        first = next((t for t in turns if isinstance(t, Mapping)), None)
        if first is not None and "role" in first:
            return "messages"
        if first is not None and ("from" in first or "value" in first):
            return "sharegpt"
    return "messages" if key == "messages" else "sharegpt"


def _required_text(fields: Mapping[str, Any], names: Sequence[str]) -> str:
    hit = _first(fields, names)
    if hit is None:
        raise DataError(f"missing '{names[0]}'")
    key, value = hit
    if not isinstance(value, str):
        raise DataError(f"'{key}' is {describe(value)}, expected a string")
    if not value.strip():
        raise DataError(f"'{key}' is empty")
    return value


def _optional_text(fields: Mapping[str, Any], names: Sequence[str]) -> str | None:
    # None and "" both mean absent: CSV has no null, and Parquet writes null for a missing optional column.
    hit = _first(fields, names)
    if hit is None or hit[1] is None:
        return None
    key, value = hit
    if not isinstance(value, str):
        raise DataError(f"'{key}' is {describe(value)}, expected a string")
    return value if value.strip() else None


# --- chat layouts ----------------------------------------------------------------------------------------------


def _turn_list(fields: Mapping[str, Any], names: Sequence[str]) -> list[Any]:
    key, turns = _first(fields, names) or (names[0], _MISSING)
    if turns is _MISSING:
        raise DataError(f"missing '{key}'")
    if not isinstance(turns, (list, tuple)):
        hint = " (a CSV or Parquet cell must hold a valid JSON list)" if isinstance(turns, str) else ""
        raise DataError(f"'{key}' is {describe(turns)}, expected a list of turns{hint}")
    if not turns:
        raise DataError(f"'{key}' is empty")
    return list(turns)


def _role(value: Any, n: int, field: str) -> str:
    if not isinstance(value, str):
        got = "missing" if value is _MISSING else describe(value)
        raise DataError(f"turn {n} '{field}' is {got}, expected a role name")
    role = ROLE_ALIASES.get(value.strip().lower())
    if role is None:
        aliases = ", ".join(a for a, r in ROLE_ALIASES.items() if a != r)
        raise DataError(f"turn {n} has unknown {field} {value[:40]!r}; expected system, user, assistant or tool "
                        f"(or an alias: {aliases})")
    return role


def _extras(turn: Mapping[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    # Null extras come from Arrow structs (every turn gets every field); they carry no information.
    return {k: v for k, v in turn.items() if k not in used and v is not None}


def _check_turn_object(turn: Any, n: int, wanted: str) -> Mapping[str, Any]:
    if not isinstance(turn, Mapping):
        raise DataError(f"turn {n} is {describe(turn)}, expected an object with {wanted}")
    return turn


def _openai_turn(turn: Any, n: int) -> dict[str, Any]:
    turn = _check_turn_object(turn, n, "'role' and 'content'")
    role = _role(turn.get("role", _MISSING), n, "role")
    extras = _extras(turn, ("role", "content"))
    # An assistant turn that only calls tools legitimately has empty (or null) content.
    content = _content(turn.get("content", _MISSING), f"turn {n} ({role})",
                       may_be_empty=bool(extras.get("tool_calls")))
    return {"role": role, "content": content, **extras}


def _content(value: Any, turn: str, *, may_be_empty: bool) -> str | list[Any]:
    """Check a turn's content; `turn` names it in messages, e.g. "turn 2 (assistant)"."""
    if value is _MISSING or value is None or (isinstance(value, str) and not value.strip()):
        if may_be_empty:
            return value if isinstance(value, str) else ""
        raise DataError(f"{turn} has {'no' if value is _MISSING else 'empty'} content")
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return _parts(value, turn, may_be_empty=may_be_empty)
    raise DataError(f"{turn} content is {describe(value)}, expected a string or a list of parts")


def _parts(parts: Sequence[Any], turn: str, *, may_be_empty: bool) -> list[Any]:
    out: list[Any] = []
    has_content = False
    for j, part in enumerate(parts, 1):
        if not isinstance(part, Mapping):
            raise DataError(f"{turn} part {j} is {describe(part)}, expected an object with a 'type'")
        ptype = part.get("type")
        if ptype not in PART_TYPES:
            got = "has no 'type'" if ptype is None else f"has type {str(ptype)[:40]!r}"
            raise DataError(f"{turn} part {j} {got}; expected one of {sorted(PART_TYPES)}")
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise DataError(f"{turn} part {j} 'text' is {describe(text)}, expected a string")
            has_content = has_content or bool(text.strip())
        else:
            has_content = True
        # Media parts pass through for the multimodal processor; only Arrow's null padding is removed.
        out.append(part if all(v is not None for v in part.values()) else _extras(part, ()))
    if not has_content and not may_be_empty:
        raise DataError(f"{turn} has empty content")
    return out


def _from_openai(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [_openai_turn(turn, n) for n, turn in enumerate(_turn_list(fields, CHAT_KEYS), 1)]


def _from_sharegpt(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = []
    for n, turn in enumerate(_turn_list(fields, CHAT_KEYS), 1):
        turn = _check_turn_object(turn, n, "'from' and 'value'")
        speaker = turn.get("from", _MISSING)
        value = turn.get("value")
        extras = _extras(turn, ("from", "value"))
        if isinstance(speaker, str) and speaker.strip().lower() == _FUNCTION_CALL:
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(value, n), **extras})
            continue
        role = _role(speaker, n, "from")
        if not isinstance(value, str):
            raise DataError(f"turn {n} ({role}) 'value' is {describe(value)}, expected a string")
        if not value.strip():
            raise DataError(f"turn {n} ({role}) has empty content")
        messages.append({"role": role, "content": value, **extras})
    return messages


def _tool_calls(value: Any, n: int) -> list[dict[str, Any]]:
    """ShareGPT ``function_call`` value (JSON ``{"name", "arguments"}`` or a list of them) → OpenAI tool_calls."""
    problem = f"turn {n} (function_call) must be JSON {{\"name\": ..., \"arguments\": ...}}"
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except (ValueError, RecursionError) as exc:  # ValueError also covers ints too long to convert
        raise DataError(f"{problem}; it is not valid JSON") from exc
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, Mapping) and isinstance(c.get("name"), str) for c in calls):
        raise DataError(problem)
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def _from_alpaca(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    instruction = _required_text(fields, INSTRUCTION_KEYS)
    output = _required_text(fields, OUTPUT_KEYS)
    extra = _optional_text(fields, INPUT_KEYS)
    user = f"{instruction}\n\n{extra}" if extra is not None else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _from_prompt_completion(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    prompt = _side(fields, ("prompt",), "user", first_turn=1)
    return prompt + _side(fields, COMPLETION_KEYS, "assistant", first_turn=len(prompt) + 1)


def _side(fields: Mapping[str, Any], names: Sequence[str], role: str, *, first_turn: int) -> list[dict[str, Any]]:
    key, value = _first(fields, names) or (names[0], None)
    if isinstance(value, (list, tuple)):
        turns = _turn_list({key: value}, (key,))
        return [_openai_turn(turn, n) for n, turn in enumerate(turns, first_turn)]
    return [{"role": role, "content": _required_text(fields, names)}]


_CHAT_BUILDERS: dict[str, Callable[[Mapping[str, Any]], list[dict[str, Any]]]] = {
    "messages": _from_openai,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def _check_conversation(messages: list[dict[str, Any]], tool_messages: str) -> None:
    """Rules every chat row must meet so that training on it is possible and meaningful."""
    has_tools = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if has_tools and tool_messages == "reject":
        raise DataError("row has tool/function turns and tool_messages='reject'")
    calls_open = False
    for n, message in enumerate(messages, 1):
        # The chat template writes a tool result inside the model turn that made the call, so a tool turn
        # without a preceding tool call cannot be rendered.
        if message["role"] == "tool" and not calls_open:
            raise DataError(f"turn {n} is a tool result but does not follow an assistant turn with tool_calls")
        if message["role"] != "tool":
            calls_open = message["role"] == "assistant" and bool(message.get("tool_calls"))
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn, so there is nothing to learn")
    last = messages[-1]["role"]
    if last != "assistant":
        raise DataError(f"last turn is {last!r}; it must be the assistant's reply, which is what is learned")


__all__ = ["EXPECTED_LAYOUTS", "FORMATS", "ROLE_ALIASES", "TOOL_MESSAGE_POLICIES", "detect_format",
           "layout_hint", "normalize_record", "text_size"]
