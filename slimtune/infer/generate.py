"""Chat generation for Gemma 4 models: chat template in, reply text (or a stream of text pieces) out.

The prompt is rendered with the tokenizer's / processor's own chat template (``add_generation_prompt=True``) so
inference sees exactly the format training used; decoding is ``model.generate`` with the KV cache. Images and
audio go through the processor, which inserts the right number of soft-token placeholders.

Stop strings end generation (a stopping criterion checks the decoded reply after every token) and are cut from
the returned text; when streaming, text that could be the start of a stop string is held back until it is known
not to be one, so the streamed pieces always concatenate to the non-streamed reply.
"""

from __future__ import annotations

import threading
import wave
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtune.errors import ConfigError

__all__ = ["generate", "validate_sampling"]

AUDIO_SAMPLE_RATE = 16_000


def validate_sampling(
    *, max_new_tokens: int, temperature: float, top_p: float, top_k: int, min_p: float, repetition_penalty: float
) -> None:
    """Check sampling settings, reporting every problem in one ConfigError.

    Raises:
        ConfigError: a value is out of range; the message names each field, its value and the valid range.
    """
    problems = []
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if temperature is None or temperature < 0:
        problems.append(f"temperature={temperature!r} must be >= 0 (0 means greedy decoding)")
    if top_p is None or not 0 < top_p <= 1:
        problems.append(f"top_p={top_p!r} must be in (0, 1] (1 disables nucleus sampling)")
    if top_k is None or top_k < 0:
        problems.append(f"top_k={top_k!r} must be >= 0 (0 disables top-k)")
    if min_p is None or not 0 <= min_p <= 1:
        problems.append(f"min_p={min_p!r} must be in [0, 1] (0 disables min-p)")
    if repetition_penalty is None or repetition_penalty <= 0:
        problems.append(f"repetition_penalty={repetition_penalty!r} must be > 0 (1 means no penalty)")
    if problems:
        raise ConfigError("invalid generation settings: " + "; ".join(problems))


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"stop={stop!r} must be a non-empty string or a list of non-empty strings")
    return stops


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Return the text before the earliest stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _load_image(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise ConfigError(f"images: cannot open {str(image)!r} as an image: {exc}") from exc
    raise ConfigError(f"images: expected PIL images or file paths, got {type(image).__name__}")


def _read_wav(path: Path) -> np.ndarray:
    try:
        with wave.open(str(path), "rb") as wf:
            rate, width, channels = wf.getframerate(), wf.getsampwidth(), wf.getnchannels()
            raw = wf.readframes(wf.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        raise ConfigError(f"audio: cannot read {str(path)!r} as a PCM .wav file: {exc}") from exc
    kinds = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 0.0, 32768.0), 4: (np.int32, 0.0, 2147483648.0)}
    if width not in kinds:
        raise ConfigError(f"audio: {str(path)!r} uses {8 * width}-bit samples; convert it to 16-bit PCM")
    dtype, offset, scale = kinds[width]
    samples = (np.frombuffer(raw, dtype=dtype).astype(np.float32) - offset) / scale
    samples = samples.reshape(-1, channels).mean(axis=1)  # the audio tower is mono
    if rate != AUDIO_SAMPLE_RATE:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(rate, AUDIO_SAMPLE_RATE)
        samples = resample_poly(samples, AUDIO_SAMPLE_RATE // g, rate // g).astype(np.float32)
    return samples


def _load_audio(clip: Any) -> np.ndarray:
    if isinstance(clip, (str, Path)):
        return _read_wav(Path(clip))
    arr = np.asarray(clip, dtype=np.float32)
    if arr.ndim != 1:
        raise ConfigError(f"audio: expected a 1-D array of 16 kHz mono samples, got shape {arr.shape}")
    return arr


def _with_media(messages: list[dict], n_images: int, n_audio: int) -> list[dict]:
    """Add ``{"type": "image"}`` / ``{"type": "audio"}`` parts when the caller passed media but no placeholders.

    The processor expands one placeholder per image/clip; without them it would reject the inputs.
    """
    def count(kind: str) -> int:
        return sum(
            1 for m in messages if isinstance(m.get("content"), list) for p in m["content"]
            if isinstance(p, dict) and p.get("type") == kind
        )

    missing_img, missing_aud = n_images - count("image"), n_audio - count("audio")
    if missing_img <= 0 and missing_aud <= 0:
        return messages
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        raise ConfigError("images/audio were given but messages contain no user turn to attach them to")
    out = [dict(m) for m in messages]
    first = out[users[0]]
    content = first.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    media = [{"type": "image"}] * max(missing_img, 0) + [{"type": "audio"}] * max(missing_aud, 0)
    first["content"] = media + parts
    return out


def _is_processor(obj: Any) -> bool:
    return hasattr(obj, "tokenizer") and (hasattr(obj, "image_processor") or hasattr(obj, "feature_extractor"))


def _prepare_inputs(model, tok_or_proc, messages, images, audio) -> tuple[dict[str, Any], Any]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts (or a string)")
    imgs = [_load_image(i) for i in (images or [])]
    clips = [_load_audio(a) for a in (audio or [])]
    if _is_processor(tok_or_proc):
        proc, tokenizer = tok_or_proc, tok_or_proc.tokenizer
        messages = _with_media(messages, len(imgs), len(clips))
        text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if imgs:
            kwargs["images"] = imgs
        if clips:
            kwargs["audio"] = clips
        # The template already starts with <bos>; do not let the tokenizer add a second one.
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos):
            kwargs["add_special_tokens"] = False
        inputs = dict(proc(**kwargs))
    else:
        if imgs or clips:
            raise ConfigError(
                "images/audio need the model's processor: pass AutoProcessor.from_pretrained(model_dir) instead "
                "of the tokenizer"
            )
        tokenizer = tok_or_proc
        inputs = dict(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        )
    device, dtype = model.device, model.dtype
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            inputs[k] = v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
    return inputs, tokenizer


class _StopCriteria:
    """Ends generation once the decoded reply contains a stop string, or when the caller cancels a stream."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len
        self.cancelled = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = self.cancelled.is_set()
        if self.stops and not done:
            text = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
            done = any(s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty):
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "use_cache": True}
    if temperature == 0:
        kw["do_sample"] = False
        # Explicit neutral values: a checkpoint's generation_config may carry sampling defaults.
        kw.update(temperature=None, top_p=None, top_k=None, min_p=None)
    else:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None, min_p=min_p or None)
    if repetition_penalty != 1.0:
        kw["repetition_penalty"] = repetition_penalty
    if tokenizer.pad_token_id is not None:
        kw["pad_token_id"] = tokenizer.pad_token_id
    return kw


def _run_generate(model, inputs, gen_kwargs, seed: int | None):
    if seed is None:
        return model.generate(**inputs, **gen_kwargs)
    # fork_rng: seeding this call must not change the caller's random stream.
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return model.generate(**inputs, **gen_kwargs)


def _stream(model, tokenizer, inputs, gen_kwargs, seed, stops, criteria) -> Iterator[str]:
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    error: list[BaseException] = []

    def work() -> None:
        try:
            _run_generate(model, inputs, {**gen_kwargs, "streamer": streamer}, seed)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread and re-raised there
            error.append(exc)
            streamer.end()  # unblock the consumer; a second end-of-stream marker is harmless

    thread = threading.Thread(target=work, name="slimtune-generate", daemon=True)
    thread.start()
    hold = max((len(s) for s in stops), default=1) - 1  # chars that might still grow into a stop string
    text, sent = "", 0
    try:
        for piece in streamer:
            text += piece
            cut, found = _cut_at_stop(text, stops)
            safe = len(cut) if found else max(sent, len(text) - hold)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            if found:
                criteria.cancelled.set()
                break
        thread.join()
        if error:
            raise error[0]
        cut, _ = _cut_at_stop(text, stops)
        if len(cut) > sent:
            yield cut[sent:]
    finally:
        # Closing the iterator early (or an exception) stops decoding at the next token.
        criteria.cancelled.set()
        thread.join()


def generate(
    model: Any,
    tokenizer_or_processor: Any,
    messages: list[dict[str, Any]] | str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    top_k: int = 64,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    stop: str | Sequence[str] | None = None,
    images: Sequence[Any] | None = None,
    audio: Sequence[Any] | None = None,
    stream: bool = False,
    seed: int | None = None,
) -> str | Iterator[str]:
    """Generate a chat reply.

    Example::

        reply = generate(model, tokenizer, [{"role": "user", "content": "Hi!"}], temperature=0)
        for piece in generate(model, processor, "What is in this picture?", images=["cat.png"], stream=True):
            print(piece, end="")

    Args:
        model: a transformers Gemma 4 model (optionally PEFT-wrapped), in eval mode.
        tokenizer_or_processor: its tokenizer, or its processor (needed for images/audio).
        messages: chat turns ``[{"role": "user", "content": ...}, ...]`` (a string is one user turn). Content may
            be a string or a list of parts (``{"type": "text"|"image"|"audio", ...}``).
        max_new_tokens: most tokens to generate.
        temperature: 0 means greedy decoding; otherwise the sampling temperature.
        top_p: nucleus sampling mass, in (0, 1].
        top_k: keep the k most likely tokens (0 disables).
        min_p: drop tokens below min_p × the top probability (0 disables).
        repetition_penalty: > 1 discourages repeats (1 disables).
        stop: string(s) that end the reply; they are not included in the output.
        images: PIL images or image paths (needs a processor); placeholders are added if messages have none.
        audio: 16 kHz mono float arrays or .wav paths (needs a processor).
        stream: return an iterator of text pieces instead of the whole reply.
        seed: seed for sampling; the global random state is left untouched.

    Returns:
        The reply text, or with ``stream=True`` an iterator of text pieces that concatenate to it. Closing the
        iterator early stops generation.

    Raises:
        ConfigError: invalid sampling settings, malformed messages, unreadable media, or media without a processor.
    """
    validate_sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty,
    )
    stops = _stop_list(stop)
    inputs, tokenizer = _prepare_inputs(model, tokenizer_or_processor, messages, images, audio)
    prompt_len = inputs["input_ids"].shape[1]
    criteria = _StopCriteria(tokenizer, stops, prompt_len)
    from transformers import StoppingCriteriaList

    gen_kwargs = _generation_kwargs(tokenizer, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty)
    gen_kwargs["stopping_criteria"] = StoppingCriteriaList([criteria])
    if stream:
        return _stream(model, tokenizer, inputs, gen_kwargs, seed, stops, criteria)
    out = _run_generate(model, inputs, gen_kwargs, seed)
    text = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    return _cut_at_stop(text, stops)[0]
