"""Top-level image/audio columns → media parts inside the conversation.

Many published multimodal datasets keep the media beside the conversation instead of inside it::

    {"messages": [...], "images": ["pics/cat.png"]}                  # paths relative to the dataset
    {"messages": [...], "image": {"bytes": b"...", "path": "x.png"}} # datasets' Image feature
    {"messages": [...], "audio": {"array": [...], "sampling_rate": 16000}}

The columns ``image``/``images`` and ``audio``/``audios`` (one value or a list) are attached as media parts:

* when the messages hold media placeholders without data (TRL style ``{"type": "image"}``), the column values
  fill them in order, one per placeholder of the same kind;
* when the messages hold no media parts, the media go to the FIRST USER TURN, before its text (images, then
  audio), which is where Gemma 4's processor puts them for a single-turn prompt;
* when the messages already hold media parts with their data, they are used as they are and the columns are
  not attached (datasets often repeat the media in a column).

Accepted values: a path (str), bytes (an encoded file), a PIL image or a numpy image array (images), a numpy/list
sample array (audio, with a row-level ``sampling_rate`` column), or the datasets feature dicts ``{"bytes",
"path"}`` / ``{"array", "sampling_rate"}``. Null means "no media". The values are only wrapped here; decoding
(and its errors, which name the row and the file) happens when the row is tokenized.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slimtune.data.describe import describe
from slimtune.errors import DataError

COLUMNS = {"image": ("images", "image"), "audio": ("audios", "audio")}
"""Media kind → accepted column names (matched ignoring case), plural first."""

_DATA_KEYS = ("path", "image", "audio", "url")  # a media part holding one of these carries its data


class MediaColumnError(DataError):
    """A media column cannot be attached (bad value, or a count that does not match the placeholders).

    Unlike other row problems it is not skipped: a wrong pairing of media and text is a dataset bug that
    would otherwise train silently on the wrong example.
    """


def _is_number_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value)


def _image_part(value: Any, where: str) -> dict:
    from PIL import Image

    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):  # datasets' Image feature
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (str, Path)) and str(value).strip():
        return {"type": "image", "path": str(value)}
    if isinstance(value, (bytes, bytearray, Image.Image)):
        return {"type": "image", "image": value}
    if isinstance(value, np.ndarray) and value.ndim in (2, 3):
        return {"type": "image", "image": value}
    raise MediaColumnError(f"{where} is {describe(value)}; expected an image file path, encoded bytes, a PIL "
                           "image, an (H, W[, C]) numpy array or a {'bytes': ..., 'path': ...} dict")


def _audio_part(value: Any, rate: Any, where: str) -> dict:
    if isinstance(value, Mapping) and "array" in value:  # datasets' Audio feature, decoded
        if value.get("sampling_rate") is None:
            raise MediaColumnError(f"{where} has an 'array' but no 'sampling_rate'")
        return {"type": "audio", "audio": {"array": value["array"], "sampling_rate": value["sampling_rate"]}}
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):  # datasets' Audio feature, stored
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (str, Path)) and str(value).strip():
        return {"type": "audio", "path": str(value)}
    if isinstance(value, (bytes, bytearray)):
        return {"type": "audio", "audio": value}
    if isinstance(value, np.ndarray) or _is_number_list(value):
        if rate is None:
            raise MediaColumnError(f"{where} is a sample array but the row has no 'sampling_rate' column; add one "
                                   "or use {'array': ..., 'sampling_rate': ...}")
        return {"type": "audio", "audio": np.asarray(value), "sampling_rate": rate}
    raise MediaColumnError(f"{where} is {describe(value)}; expected an audio file path, encoded bytes, a sample "
                           "array or a {'array': ..., 'sampling_rate': ...} / {'bytes': ..., 'path': ...} dict")


def _column(fields: Mapping[str, Any], kind: str) -> tuple[str, list[dict]]:
    """(column name, media parts) of one kind; ([], "") when the row has no such column or it is null."""
    key = next((k for k in COLUMNS[kind] if fields.get(k) is not None), None)
    if key is None:
        return "", []
    value = fields[key]
    # One clip given as a plain list of samples, or one image array, is a single item, not a list of them.
    single = not isinstance(value, (list, tuple)) or (kind == "audio" and _is_number_list(value))
    items = [value] if single else list(value)
    rate = fields.get("sampling_rate")
    parts = []
    for j, item in enumerate(items, 1):
        where = f"'{key}'" if single else f"'{key}' item {j}"
        parts.append(_image_part(item, where) if kind == "image" else _audio_part(item, rate, where))
    return key, parts


def _media_slots(messages: list[dict]) -> tuple[list[tuple[int, int, str]], bool]:
    """Placeholder parts (turn index, part index, kind) and whether any media part already carries data."""
    slots, has_data = [], False
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in ("image", "audio", "image_url", "input_audio", "video"):
                continue
            if any(part.get(k) is not None for k in _DATA_KEYS) or kind not in COLUMNS:
                has_data = True
            else:
                slots.append((i, j, kind))
    return slots, has_data


def attach_media_columns(fields: Mapping[str, Any], messages: list[dict]) -> None:
    """Move the row's media columns into `messages` (in place; see the module docstring).

    Args:
        fields: the row's top-level fields, keys lower-cased.
        messages: the row's normalised turns.

    Raises:
        MediaColumnError: an unsupported value, placeholders and column values that do not pair up one to one,
            or no user turn to attach to.
    """
    columns = {kind: _column(fields, kind) for kind in COLUMNS}
    if not any(parts for _, parts in columns.values()):
        return
    names = " and ".join(f"'{key}'" for key, parts in columns.values() if parts)
    slots, has_data = _media_slots(messages)
    if has_data and not slots:
        return  # the messages carry their own media (datasets often repeat them in a column): keep them as they are
    if slots:
        for kind, (key, parts) in columns.items():
            mine = [(i, j) for i, j, k in slots if k == kind]
            if len(mine) != len(parts):
                raise MediaColumnError(f"row has {len(mine)} {kind} placeholder(s) in its messages but "
                                       f"{len(parts)} {kind}(s) in the '{key or COLUMNS[kind][0]}' column; "
                                       "they must pair up one to one")
            for (i, j), part in zip(mine, parts):
                messages[i]["content"][j] = {**messages[i]["content"][j], **part}
        return
    user = next((m for m in messages if m.get("role") == "user"), None)
    if user is None:
        raise MediaColumnError(f"row has {names} but no user turn to attach them to")
    content = user["content"]
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    user["content"] = columns["image"][1] + columns["audio"][1] + text


def reject_media_columns(fields: Mapping[str, Any]) -> None:
    """Plain-text rows cannot carry media: refuse a non-null media column instead of ignoring it.

    Raises:
        MediaColumnError: the row has a non-null image/audio column.
    """
    present = [k for names in COLUMNS.values() for k in names if fields.get(k) is not None]
    if present:
        raise MediaColumnError(f"a 'text' row cannot carry media (column {present[0]!r}); use a chat layout "
                               "such as 'messages' or prompt/completion for image or audio rows")
