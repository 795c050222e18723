"""Image and audio chat rows → token ids, labels and the tower inputs, without torchvision.

transformers will not build ``Gemma4Processor`` without torchvision (its video processor needs it), so the front
end is rebuilt from the checkpoint's ``processor_config.json``: the PIL image processor
(``Gemma4ImageProcessorPil``) and the audio feature extractor (``Gemma4AudioFeatureExtractor``). Each media part
is expanded by hand to ``boi + image_token * n + eoi`` (``boa + audio_token * n + eoa``) where n is exactly the
number of soft tokens the tower emits for it, as ``Gemma4Processor`` does.

The expansion is written into the conversation as a text part and the conversation goes through
``tokenize_chat``, so labels come from the same assistant-span logic (one tokenization, chat-template spans) as
text rows. Media tokens (begin/end markers and soft-token placeholders) are never labels.

Row format (inside ``messages[i]["content"]`` lists)::

    {"type": "image", "path": "pics/cat.png"}          # relative to media_root
    {"type": "image", "image": <PIL.Image | bytes | path | (H, W[, C]) numpy array>}
    {"type": "audio", "path": "clips/a.wav"}           # WAV (stdlib ``wave``; soundfile if installed)
    {"type": "audio", "audio": <1-D float array>, "sampling_rate": 22050}
    {"type": "audio", "audio": <WAV bytes>}
"""

from __future__ import annotations

import io
import json
import math
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.data.tokenize import IGNORE_INDEX, Example, text_tokenizer, tokenize_chat
from slimtune.errors import ConfigError, DataError

IMAGE_BUDGETS: tuple[int, ...] = (70, 140, 280, 560, 1120)
"""Soft tokens per image that Gemma 4's image processor supports."""

AUDIO_SAMPLING_RATE = 16_000
MAX_AUDIO_SECONDS = 30.0
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 1_000, 384_000
"""Sample rates (Hz) accepted in files and arrays; anything else is rejected as unsupported."""

IMAGE_TYPE_ID, AUDIO_TYPE_ID = 1, 3  # mm_token_type_ids as transformers' ProcessorMixin.create_mm_token_type_ids

MEDIA_EXTRAS = ("pixel_values", "image_position_ids", "input_features", "input_features_mask")
TOKEN_EXTRAS = ("mm_token_type_ids",)  # one value per token: padded / truncated with input_ids

_MEDIA_TYPES = ("image", "audio", "image_url", "input_audio", "video")


@dataclass
class MediaFrontEnd:
    """The torchvision-free Gemma 4 front end of one checkpoint."""

    image_processor: Any
    feature_extractor: Any | None  # None when the checkpoint has no audio front end
    max_soft_tokens: int
    image_token: str = "<|image|>"
    boi_token: str = "<|image>"
    eoi_token: str = "<image|>"
    audio_token: str = "<|audio|>"
    boa_token: str = "<|audio>"
    eoa_token: str = "<audio|>"


def load_media_front_end(model_dir: str | Path, *, max_soft_tokens: int | None = None) -> MediaFrontEnd:
    """Read a checkpoint folder's ``processor_config.json`` (and the named media tokens of its tokenizer config).

    Args:
        model_dir: A multimodal Gemma 4 checkpoint folder.
        max_soft_tokens: Image budget (one of ``IMAGE_BUDGETS``); None keeps the saved one.

    Raises:
        ConfigError: no readable ``processor_config.json``, or an unsupported image budget.
    """
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    if max_soft_tokens is not None and (isinstance(max_soft_tokens, bool) or max_soft_tokens not in IMAGE_BUDGETS):
        raise ConfigError(f"image max_soft_tokens must be one of {list(IMAGE_BUDGETS)}, got {max_soft_tokens!r}.")
    path = Path(model_dir) / "processor_config.json"
    try:
        spec = json.loads(path.read_text())
        image_spec = dict(spec["image_processor"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the image/audio front end ({exc}); image and audio rows need a "
                          "multimodal Gemma 4 checkpoint (text_only checkpoints have no processor_config.json).") \
            from exc
    if max_soft_tokens is not None:
        image_spec["max_soft_tokens"] = max_soft_tokens
    image_processor = Gemma4ImageProcessorPil.from_dict(image_spec)
    fe_spec = spec.get("feature_extractor")
    feature_extractor = Gemma4AudioFeatureExtractor.from_dict(fe_spec) if fe_spec else None
    tokens = {}
    tok_cfg = Path(model_dir) / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            saved = json.loads(tok_cfg.read_text())
        except ValueError:
            saved = {}
        tokens = {k: saved[k] for k in ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token",
                                        "eoa_token") if isinstance(saved.get(k), str)}
    return MediaFrontEnd(image_processor, feature_extractor, int(image_processor.max_soft_tokens), **tokens)


def has_media(messages: Any) -> bool:
    """Whether any message content holds an image/audio part."""
    if not isinstance(messages, list):
        return False
    return any(isinstance(part, Mapping) and part.get("type") in _MEDIA_TYPES
               for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
               for part in m["content"])


def audio_soft_tokens(frame_mask: np.ndarray | torch.Tensor) -> int:
    """Soft tokens of one clip: valid mel frames after the audio tower's two stride-2 convolutions.

    Same arithmetic as ``Gemma4Processor.replace_audio_token``.
    """
    mask = np.asarray(frame_mask)
    for _ in range(2):
        mask = mask[::2][: (len(mask) - 1) // 2 + 1]
    return int(mask.sum())


# ---------------------------------------------------------------- loading media


def _where(row: Any, name: str) -> str:
    return f"row {row}, {name}" if row is not None else name


def _resolve(value: Any, media_root: str | Path | None) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() or media_root is None else Path(media_root) / p


def _load_image(part: Mapping, media_root, row) -> tuple[Any, str]:
    from PIL import Image

    src = part.get("path", part.get("image"))
    if src is None and isinstance(part.get("url"), str) and "://" not in part["url"]:
        src = part["url"]
    if isinstance(src, Image.Image):
        return src.convert("RGB"), "image (PIL)"
    if isinstance(src, np.ndarray):
        return _array_image(src, row), "image (array)"
    if isinstance(src, (bytes, bytearray)):
        name, opener = "image (bytes)", lambda: io.BytesIO(src)
    elif isinstance(src, (str, Path)):
        path = _resolve(src, media_root)
        name, opener = str(path), lambda: path
        if not path.is_file():
            raise DataError(f"{_where(row, name)}: image file not found (relative paths are resolved against "
                            f"{media_root or 'the working directory'}).")
    else:
        raise DataError(f"{_where(row, 'image part')}: expected 'path' (a file) or 'image' (PIL image or bytes), "
                        f"got keys {sorted(part)}.")
    try:
        with Image.open(opener()) as img:
            img.load()
            return img.convert("RGB"), name
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad data
        raise DataError(f"{_where(row, name)}: corrupt or unsupported image ({type(exc).__name__}: {exc}).") \
            from exc


def _array_image(array: np.ndarray, row) -> Any:
    """(H, W) or (H, W, 1|3|4) pixels, uint8 or floats in [0, 1] (what numpy/datasets hand over) → RGB PIL."""
    from PIL import Image

    a = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.size == 0:
        raise DataError(f"{_where(row, 'image (array)')}: shape {array.shape} is not an image; expected (H, W) "
                        "or (H, W, 3).")
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise DataError(f"{_where(row, 'image (array)')}: the pixels contain NaN or infinite values.")
        a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).round().astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def _read_wav(source, name: str, row) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError:
        soundfile = None
    try:
        if soundfile is not None:
            data, rate = soundfile.read(source, dtype="float32", always_2d=True)
            return data.mean(axis=1), int(rate)
        with wave.open(source if isinstance(source, io.BytesIO) else str(source), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            if rate <= 0:  # checked before reading: a zero rate makes the duration undefined
                return np.zeros(0, np.float32), rate
            raw = w.readframes(n)
    except Exception as exc:
        raise DataError(f"{_where(row, name)}: unreadable audio ({type(exc).__name__}: {exc}); use a PCM WAV "
                        "file (or install soundfile for other formats).") from exc
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        samples = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        samples = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float32) / float(1 << 23)
    else:
        raise DataError(f"{_where(row, name)}: unreadable audio ({8 * width}-bit samples are not supported).")
    if channels > 1:
        samples = samples[: len(samples) // channels * channels].reshape(-1, channels).mean(axis=1)
    return samples, rate


def _load_audio(part: Mapping, media_root, row) -> tuple[np.ndarray, str]:
    src = part.get("path", part.get("audio"))
    if isinstance(src, Mapping) and "array" in src:  # datasets' Audio feature: {"array", "sampling_rate"}
        part, src = {**part, "sampling_rate": src.get("sampling_rate")}, src["array"]
    if isinstance(src, (bytes, bytearray)):
        name = "audio (bytes)"
        samples, rate = _read_wav(io.BytesIO(src), name, row)
    elif isinstance(src, (str, Path)):
        path = _resolve(src, media_root)
        name = str(path)
        if not path.is_file():
            raise DataError(f"{_where(row, name)}: audio file not found (relative paths are resolved against "
                            f"{media_root or 'the working directory'}).")
        samples, rate = _read_wav(path, name, row)
    elif src is not None:
        name = "audio (array)"
        try:
            samples = np.asarray(src, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{_where(row, name)}: unreadable audio array ({exc}).") from exc
        if samples.ndim == 2:  # (channels, samples) or (samples, channels): average the shorter axis
            samples = samples.mean(axis=int(np.argmin(samples.shape)))
        if samples.ndim != 1:
            raise DataError(f"{_where(row, name)}: unreadable audio array of shape {samples.shape}; expected 1-D.")
        rate = part.get("sampling_rate")
        if rate is None:
            raise DataError(f"{_where(row, name)}: an 'audio' array needs a 'sampling_rate'.")
    else:
        raise DataError(f"{_where(row, 'audio part')}: expected 'path' (a WAV file) or 'audio' (array with "
                        f"'sampling_rate', or WAV bytes), got keys {sorted(part)}.")
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer, float)) or rate != int(rate) \
            or not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise DataError(f"{_where(row, name)}: unsupported sample rate {rate!r}; expected an integer between "
                        f"{MIN_SOURCE_RATE} and {MAX_SOURCE_RATE} Hz.")
    rate = int(rate)
    if samples.size == 0:
        raise DataError(f"{_where(row, name)}: the audio is empty.")
    if not np.isfinite(samples).all():
        raise DataError(f"{_where(row, name)}: the audio contains NaN or infinite samples.")
    seconds = samples.size / rate
    if seconds > MAX_AUDIO_SECONDS:
        raise DataError(f"{_where(row, name)}: audio is {seconds:.1f} s long; Gemma 4 takes at most "
                        f"{MAX_AUDIO_SECONDS:.0f} s per clip. Split it into shorter clips.")
    if rate != AUDIO_SAMPLING_RATE:
        from scipy.signal import resample_poly

        g = math.gcd(rate, AUDIO_SAMPLING_RATE)
        samples = resample_poly(samples, AUDIO_SAMPLING_RATE // g, rate // g).astype(np.float32)
    return samples, name


# ---------------------------------------------------------------- tokenization


def tokenize_multimodal_chat(front_end: MediaFrontEnd, tokenizer_or_processor, messages: list[dict], *,
                             media_root: str | Path | None = None, train_on: str = "assistant",
                             row: Any = None) -> Example:
    """Tokenize one conversation with image/audio parts.

    Returns:
        An Example whose extras hold ``mm_token_type_ids`` (1, T) and, when present, ``pixel_values`` /
        ``image_position_ids`` (n_images, patches, …) and ``input_features`` / ``input_features_mask``
        (n_clips, frames, …), in the order the parts appear in the conversation.

    Raises:
        DataError: a media file is missing or unreadable, an audio clip is too long or has an unsupported
            sample rate, the checkpoint has no audio front end, or the text itself contains media tokens.
    """
    tok = text_tokenizer(tokenizer_or_processor)
    images, clips, new_messages = [], [], []
    slots = []  # ("image"|"audio", index into images/clips, message index, part index)
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if not isinstance(content, list):
            new_messages.append(msg)
            continue
        parts = list(content)
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                images.append(_load_image(part, media_root, row)[0])
                slots.append(("image", len(images) - 1, i, j))
            elif kind == "audio":
                if front_end.feature_extractor is None:
                    raise DataError(f"{_where(row, 'audio part')}: this checkpoint has no audio tower "
                                    "(only E2B/E4B take audio).")
                clips.append(_load_audio(part, media_root, row)[0])
                slots.append(("audio", len(clips) - 1, i, j))
            elif kind in _MEDIA_TYPES:
                raise DataError(f"{_where(row, f'{kind} part')}: unsupported; use {{'type': 'image', 'path': …}} "
                                "or {'type': 'audio', 'path': …}.")
        new_messages.append({**msg, "content": parts})

    extras: dict[str, torch.Tensor] = {}
    n_image: list[int] = []
    n_audio: list[int] = []
    if images:
        pix = front_end.image_processor(images=images, return_tensors="pt")
        extras["pixel_values"] = pix["pixel_values"]
        extras["image_position_ids"] = pix["image_position_ids"]
        n_image = [int(n) for n in pix["num_soft_tokens_per_image"]]
    if clips:
        feats = front_end.feature_extractor(clips, sampling_rate=AUDIO_SAMPLING_RATE, return_tensors="pt")
        extras["input_features"] = feats["input_features"]
        extras["input_features_mask"] = feats["input_features_mask"]
        n_audio = [audio_soft_tokens(m) for m in feats["input_features_mask"].numpy()]
    fe = front_end
    for kind, k, i, j in slots:
        text = (fe.boi_token + fe.image_token * n_image[k] + fe.eoi_token if kind == "image"
                else fe.boa_token + fe.audio_token * n_audio[k] + fe.eoa_token)
        new_messages[i]["content"][j] = {"type": "text", "text": text}

    ex = tokenize_chat(tok, new_messages, train_on=train_on)
    ids = torch.tensor([ex.input_ids], dtype=torch.long)
    image_id, audio_id = tok.convert_tokens_to_ids(fe.image_token), tok.convert_tokens_to_ids(fe.audio_token)
    if int((ids == image_id).sum()) != sum(n_image) or int((ids == audio_id).sum()) != sum(n_audio):
        raise DataError(f"{_where(row, 'messages')}: the text contains media tokens ({fe.image_token} or "
                        f"{fe.audio_token}) of its own; use image/audio parts instead.")
    media_ids = {tok.convert_tokens_to_ids(t) for t in (fe.image_token, fe.boi_token, fe.eoi_token,
                                                         fe.audio_token, fe.boa_token, fe.eoa_token)}
    labels = [IGNORE_INDEX if t in media_ids else y for t, y in zip(ex.input_ids, ex.labels)]
    extras["mm_token_type_ids"] = ((ids == image_id).long() * IMAGE_TYPE_ID + (ids == audio_id).long()
                                   * AUDIO_TYPE_ID)
    return Example(ex.input_ids, labels, extras)


def truncate_multimodal(ex: Example, max_seq_length: int, *, row: Any = None) -> Example:
    """Cut a multimodal example to max_seq_length tokens, refusing to cut through (or drop) a media block.

    Raises:
        DataError: a media soft token lies at or beyond max_seq_length.
    """
    types = ex.extras.get("mm_token_type_ids")
    if types is not None and bool(types[0, max_seq_length:].any()):
        raise DataError(f"{_where(row, 'messages')}: {len(ex.input_ids)} tokens with images/audio beyond "
                        f"max_seq_length={max_seq_length}; media cannot be truncated. Raise max_seq_length, "
                        "lower the image budget (max_soft_tokens) or shorten the audio.")
    extras = {k: (v[:, :max_seq_length] if k in TOKEN_EXTRAS else v) for k, v in ex.extras.items()}
    return Example(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length], extras)


# ---------------------------------------------------------------- batching

_PAD_VALUES = {"image_position_ids": -1}  # as Gemma4ImageProcessorPil pads patches


def stack_extras(examples: list[Example], width: int) -> dict[str, torch.Tensor]:
    """Batch the multimodal extras of examples (some may be text-only).

    Per-token extras (``mm_token_type_ids``) are right-padded with 0 to ``width``; tower inputs are concatenated
    along dim 0 in example order, each padded along dim 1 to the longest (audio frames, image patches).
    """
    out: dict[str, torch.Tensor] = {}
    keys = [k for e in examples for k in e.extras]
    for key in dict.fromkeys(keys):
        if key in TOKEN_EXTRAS:
            t = torch.zeros((len(examples), width), dtype=torch.long)
            for i, e in enumerate(examples):
                if key in e.extras:
                    v = e.extras[key]
                    t[i, : v.shape[1]] = v[0]
            out[key] = t
            continue
        parts = [e.extras[key] for e in examples if key in e.extras]
        if len(parts) > 1 and len({p.shape[1:] for p in parts}) > 1:
            longest = max(p.shape[1] for p in parts)
            padded = []
            for p in parts:
                q = torch.full((p.shape[0], longest, *p.shape[2:]), _PAD_VALUES.get(key, 0), dtype=p.dtype)
                q[:, : p.shape[1]] = p
                padded.append(q)
            parts = padded
        out[key] = torch.cat(parts)
    return out
