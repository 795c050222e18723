"""A small Gemma-style tokenizer (and multimodal processor) built in-process for the tiny test models.

The tokenizer has the same shape as Gemma's own: a BPE with byte fallback, where spaces are written as ``▁``
and any character missing from the vocabulary falls back to its UTF-8 bytes ``<0x00>``..``<0xFF>``. That makes
every UTF-8 string round-trip, and it is exactly what ``transformers.GemmaTokenizer`` rebuilds from a saved
vocabulary, so ``AutoTokenizer.from_pretrained`` loads the folder back unchanged. (As with Gemma's own, the one
exception to the round trip is a literal ``▁`` in the input, which decodes as a space.) The merges are learned
with the ``tokenizers`` library on the bundled dataset plus a little English, so the demo data encodes into
short sequences (about 1.3 K tokens of vocabulary instead of Gemma's 262 K).

Gemma 4's control tokens sit at fixed low ids (``SPECIAL_TOKENS``), and the multimodal ones are also declared
as named special tokens (``image_token``, ``boi_token``, ...) because ``Gemma4Processor`` reads them from
the tokenizer; named tokens are written to ``tokenizer_config.json`` and survive a save/load round trip.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import GemmaTokenizer

from slimtune.data.chat_template import GEMMA4_CHAT_TEMPLATE
from slimtune.errors import ConfigError, SlimtuneError

# Order fixes the ids: Gemma's pad/eos/bos/unk/mask at 0-4 (as in the released tokenizer), then Gemma 4's
# control tokens. ``<mask>`` is kept because ``GemmaTokenizer`` defaults its mask token to it and would
# otherwise append a new token on reload.
_SPECIAL_TOKEN_ORDER: tuple[str, ...] = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>",
    "<|image>", "<image|>", "<|image|>",
    "<|audio>", "<audio|>", "<|audio|>",
    "<|video|>",
    "<|channel>", "<channel|>", "<|think|>",
    "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
)  # fmt: skip

SPECIAL_TOKENS: dict[str, int] = {token: i for i, token in enumerate(_SPECIAL_TOKEN_ORDER)}
"""Special token string -> id, identical in every tokenizer ``build_tokenizer`` returns."""

# Named multimodal tokens as transformers' Gemma 4 processor expects them on the tokenizer.
MULTIMODAL_TOKEN_NAMES: dict[str, str] = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "video_token": "<|video|>",
}

VOCAB_SIZE: int = 1536
"""Upper bound for the BPE trainer: specials + 256 byte tokens + characters + merges. The bundled corpus runs out
of merges seen twice before that, so the vocabulary ends up smaller (1,292 with the current dataset)."""

_BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))

_DATASET_PATH = Path(__file__).resolve().parents[1] / "data" / "default_data.jsonl"

# A little general English so that text outside the dataset still encodes into word pieces, not bytes.
_EXTRA_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A small model can learn simple patterns quickly.
Hello, how are you today? I am fine, thank you. Please answer the question in one sentence.
This is a test of the tokenizer. Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 and 2024 appear in text.
Fine-tuning adapts a pretrained language model to new data with low-rank adapters (LoRA).
Images, audio and video can be described in words: a red ball, a loud bell, a short clip.
"What time is it?" she asked. It's half past three; the train leaves at four o'clock!
Write code: def add(a, b): return a + b  # returns the sum
Tabs\tand newlines\nare ordinary characters too. Email: name@example.com, path: /tmp/file.txt
"""

_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in sorted(_SPECIAL_TOKEN_ORDER, key=len, reverse=True)))


def _training_texts() -> Iterator[str]:
    """Texts the merges are learned from: dataset conversations as the chat template writes them, and English."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ImmutableSandboxedEnvironment().from_string(GEMMA4_CHAT_TEMPLATE)
    with _DATASET_PATH.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rendered = template.render(messages=json.loads(line)["messages"], bos_token="<bos>")
                # Control tokens are atomic ids; train only on the text between them.
                yield from (piece for piece in _SPECIAL_SPLIT.split(rendered) if piece)
    yield from _EXTRA_ENGLISH.splitlines(keepends=True)


@functools.lru_cache(maxsize=1)
def _trained_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Learn the BPE once per process (deterministic: same data, same result)."""
    trainer_tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    # Same normalisation GemmaTokenizer applies; the split only keeps merges inside "▁word" pieces so the
    # learned vocabulary looks like SentencePiece's (inference runs without any pre-tokenizer, as Gemma's).
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    # Newlines never merge with neighbouring text (as in Gemma's own vocabulary): a "\nThe" token would
    # straddle the chat header "<|turn>model\n" and the reply, so a model trained on whole conversations would
    # see different tokens at inference, where the prompt ends with a separate "\n".
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
    ])
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[*_SPECIAL_TOKEN_ORDER, *_BYTE_TOKENS],  # fixed ids 0..276, in this order
        min_frequency=2,
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(_training_texts(), trainer=trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    vocab = tuple(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return vocab, merges  # type: ignore[return-value]


def build_tokenizer(*, chat_template: str = GEMMA4_CHAT_TEMPLATE) -> GemmaTokenizer:
    """Build the tiny Gemma 4 tokenizer.

    Args:
        chat_template: Jinja chat template stored on the tokenizer (default: Gemma 4 without thinking).

    Returns:
        A fresh ``GemmaTokenizer`` (a ``PreTrainedTokenizerFast``) with ``SPECIAL_TOKENS`` at their ids,
        ``<bos>`` prepended by default and no ``<eos>`` appended.

    Example:
        >>> tok = build_tokenizer()
        >>> tok("hi").input_ids[0] == SPECIAL_TOKENS["<bos>"]
        True
    """
    vocab, merges = _trained_vocab_and_merges()
    tokenizer = GemmaTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",  # training batches; generation code can switch to left
        extra_special_tokens=dict(MULTIMODAL_TOKEN_NAMES),
        chat_template=chat_template,
    )
    # The control tokens are already in the vocabulary; registering them as special makes the tokenizer
    # match them atomically in text instead of spelling them out.
    control = [t for t in _SPECIAL_TOKEN_ORDER[5:] if t not in MULTIMODAL_TOKEN_NAMES.values()]
    tokenizer.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    _check_ids(tokenizer)
    return tokenizer


def _check_ids(tokenizer: GemmaTokenizer) -> None:
    """Internal invariant: every special token kept its fixed id and nothing was appended."""
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert got == SPECIAL_TOKENS, f"special token ids drifted: {got}"
    assert len(tokenizer) == len(_trained_vocab_and_merges()[0]), "tokenizer grew past its trained vocabulary"


def multimodal_token_ids() -> dict[str, int]:
    """Ids for ``Gemma4Config``'s multimodal token fields, taken from ``SPECIAL_TOKENS``."""
    return {
        "image_token_id": SPECIAL_TOKENS["<|image|>"],
        "boi_token_id": SPECIAL_TOKENS["<|image>"],
        "eoi_token_id": SPECIAL_TOKENS["<image|>"],
        "audio_token_id": SPECIAL_TOKENS["<|audio|>"],
        "boa_token_id": SPECIAL_TOKENS["<|audio>"],
        "eoa_token_index": SPECIAL_TOKENS["<audio|>"],  # transformers spells this one "_index"
        "video_token_id": SPECIAL_TOKENS["<|video|>"],
    }


class ProcessorUnavailableError(SlimtuneError, ImportError):
    """``Gemma4Processor`` cannot be built here: transformers requires torchvision for its video processor."""


PROCESSOR_CLASS = "Gemma4Processor"
_AUDIO_SEQ_LENGTH = 750  # released cap on audio soft tokens per clip
_AUDIO_MS_PER_TOKEN = 40  # 10 ms mel hop x two stride-2 convolutions


def _front_end(config: Any, max_soft_tokens: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Image-processor, feature-extractor and video-processor settings that fit ``config``'s towers."""
    if getattr(config, "vision_config", None) is None:
        raise ConfigError("build_processor needs a multimodal Gemma4Config (with vision_config), got a text config.")
    vision = config.vision_config
    patches = {
        "patch_size": vision.patch_size,
        "pooling_kernel_size": vision.pooling_kernel_size,
        "max_soft_tokens": max_soft_tokens,
    }
    # The audio tower sizes its input layer for subsampling_conv_channels[0] mel bins (128 when released).
    audio = getattr(config, "audio_config", None)
    features = {"feature_size": audio.subsampling_conv_channels[0] if audio is not None else 128}
    return patches, features, dict(patches)


def processor_config_dict(config: Any, *, max_soft_tokens: int = 70) -> dict[str, Any]:
    """The ``processor_config.json`` content that ``Gemma4Processor.save_pretrained`` would write for ``config``.

    Built without torchvision, so a checkpoint folder written on a machine without it still carries a
    processor that ``AutoProcessor`` loads wherever torchvision is installed.

    Args:
        config: A multimodal ``Gemma4Config``.
        max_soft_tokens: Image budget in soft tokens (see ``build_processor``).

    Returns:
        A JSON-serialisable dict with the nested image processor, feature extractor and video processor.

    Raises:
        ConfigError: ``config`` has no vision tower.
    """
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    patches, features, video = _front_end(config, max_soft_tokens)
    return {
        "processor_class": PROCESSOR_CLASS,
        # to_json_string, not to_dict: it drops the numpy buffers (mel filters, window) that are derived data.
        "image_processor": json.loads(Gemma4ImageProcessorPil(**patches).to_json_string()),
        "feature_extractor": json.loads(Gemma4AudioFeatureExtractor(**features).to_json_string()),
        # Only what differs from Gemma4VideoProcessor's defaults; AutoVideoProcessor fills in the rest.
        "video_processor": {"video_processor_type": "Gemma4VideoProcessor", **video},
        "image_seq_length": max_soft_tokens,
        "audio_seq_length": _AUDIO_SEQ_LENGTH,
        "audio_ms_per_token": _AUDIO_MS_PER_TOKEN,
    }


def build_processor(tokenizer: GemmaTokenizer, config: Any, *, max_soft_tokens: int = 70) -> Any:
    """Build a ``Gemma4Processor`` whose image and audio front ends match a (tiny) ``Gemma4Config``.

    Args:
        tokenizer: A tokenizer from ``build_tokenizer``. ``Gemma4Processor`` registers ``<|video|>`` on it.
        config: A multimodal ``Gemma4Config`` (with ``vision_config``, optionally ``audio_config``).
        max_soft_tokens: Image budget in soft tokens (transformers allows 70/140/280/560/1120; the released
            models default to 280). 70 keeps tiny test sequences short.

    Returns:
        ``Gemma4Processor`` with the PIL image processor (patch size and pooling from the vision config), a
        feature extractor whose mel-bin count fits the audio tower, and a matching video processor.

    Raises:
        ConfigError: ``config`` has no vision tower.
        ProcessorUnavailableError: torchvision cannot be imported. transformers (5.17 and 5.24) will not build
            a ``Gemma4Processor`` without its torchvision-based ``Gemma4VideoProcessor``.
    """
    from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

    patches, features, video = _front_end(config, max_soft_tokens)
    try:
        from transformers import Gemma4Processor, Gemma4VideoProcessor

        video_processor = Gemma4VideoProcessor(**video)
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
        raise ProcessorUnavailableError(
            f"Gemma4Processor needs torchvision, which cannot be imported here ({type(exc).__name__}: "
            f"{str(exc).strip()[:120]}). Install a torchvision that matches your torch to build the processor."
        ) from exc

    extra_before = list(tokenizer.extra_special_tokens)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(**features),
        image_processor=Gemma4ImageProcessorPil(**patches),
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
        image_seq_length=max_soft_tokens,
        audio_seq_length=_AUDIO_SEQ_LENGTH,
        audio_ms_per_token=_AUDIO_MS_PER_TOKEN,
    )
    # Gemma4Processor.__init__ re-registers <|video|> and thereby replaces the tokenizer's list of extra special
    # tokens; put the control tokens back so the caller's tokenizer keeps saving them as special.
    tokenizer.extra_special_tokens = extra_before + [t for t in tokenizer.extra_special_tokens if t not in extra_before]
    return processor


__all__ = [
    "MULTIMODAL_TOKEN_NAMES",
    "PROCESSOR_CLASS",
    "SPECIAL_TOKENS",
    "ProcessorUnavailableError",
    "build_processor",
    "build_tokenizer",
    "multimodal_token_ids",
    "processor_config_dict",
]
