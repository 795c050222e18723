"""`load_model`: a local HF folder or hub id → a frozen transformers Gemma 4 model plus its tokenizer/processor."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from slimtune.adapt.experts_nf4 import quantize_experts_nf4
from slimtune.adapt.quantize import is_nf4_linear, keep_standard_nf4_layout, quantize_model_nf4
from slimtune.errors import ConfigError, ModelLoadError
from slimtune.models.geometry import RANDOM_PREFIX
from slimtune.models import gemma4 as _gemma4  # noqa: F401 - registers the family
from slimtune.models.registry import ModelFamily, family_for_model_type

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32,
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` → the first CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto" → bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU.

    Raises:
        ConfigError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {sorted(set(_DTYPES))} or 'auto'.")
    return _DTYPES[dtype]


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """Return a local folder for a path or hub id, downloading hub ids through huggingface_hub.

    Raises:
        ModelLoadError: the folder does not exist, or the hub id cannot be fetched (offline, unknown, gated).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model folder {text!r} does not exist. Pass a local Hugging Face folder "
                             "(with config.json and *.safetensors) or a hub id such as 'google/gemma-4-E2B-it'.")
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        local = snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    except Exception as exc:  # any hub failure becomes one actionable message
        raise ModelLoadError(
            f"could not fetch {text!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). "
            f"If this machine is offline, download the model elsewhere and pass its local folder instead, "
            f"e.g. slimtune train --model /path/to/{text.split('/')[-1]}."
        ) from exc
    return Path(local)


def read_config(folder: Path) -> dict:
    """Read and parse `config.json`, with errors that name the file."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        return json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({exc}); the download may be corrupt.") from exc


def check_weight_files(folder: Path) -> list[Path]:
    """Find the safetensors shards and check each header parses, so corrupt files fail before loading starts."""
    from safetensors import safe_open  # noqa: PLC0415

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{index} is corrupt ({exc}).") from exc
        shards = [folder / s for s in shard_names]
    elif (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    else:
        found = sorted(p.name for p in folder.iterdir())
        raise ModelLoadError(f"{folder} has no weights: expected one of {list(_WEIGHT_FILES)}, found {found}.")
    for shard in shards:
        if not shard.is_file():
            raise ModelLoadError(f"weight shard {shard.name} listed in the index is missing from {folder}.")
        try:
            with safe_open(str(shard), framework="pt") as f:
                f.keys()
        except Exception as exc:
            raise ModelLoadError(f"weight file {shard} is corrupt or truncated ({exc}); download it again.") from exc
    return shards


def model_class_for(config: dict, family: ModelFamily):
    """The transformers class for a checkpoint: multimodal when the config has towers, else causal LM."""
    import transformers  # noqa: PLC0415

    multimodal = config.get("model_type") == family.model_types[0] and family.multimodal_class
    return getattr(transformers, family.multimodal_class if multimodal else family.causal_class)


def attention_plan(cls) -> str | dict:
    """sdpa everywhere, except the audio tower where the installed transformers refuses it.

    transformers 5.17's audio tower is only correct under sdpa (its eager mask is inverted); 5.24 fixed eager
    and declares the tower eager-only. Asking for sdpa where it is supported picks the right one on both.
    """
    module = importlib.import_module(cls.__module__)
    audio = getattr(module, "Gemma4AudioModel", None)
    if audio is not None and not getattr(audio, "_supports_sdpa", True) and "Conditional" in cls.__name__:
        return {"text_config": "sdpa", "vision_config": "sdpa", "audio_config": "eager"}
    return "sdpa"


def load_tokenizer(folder: Path, multimodal: bool):
    """The processor for multimodal checkpoints (falling back to the tokenizer), else the tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer  # noqa: PLC0415

    from slimtune.data.chat_template import GEMMA4_CHAT_TEMPLATE  # noqa: PLC0415

    proc = None
    if multimodal and ((folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()):
        try:
            proc = AutoProcessor.from_pretrained(str(folder))
        except ImportError as exc:
            # transformers builds Gemma4Processor only with torchvision (for its video processor). Text
            # training does not need it, so return the tokenizer and say what image/audio input requires.
            warnings.warn(f"returning the tokenizer instead of the processor of {folder}: {str(exc).strip()[:160]} "
                          "Training on image/audio rows works without it (slimtune.data.multimodal); install torchvision "
                          "matching your torch for transformers' processor (chat with images and audio).",
                          stacklevel=3)
    try:
        tok = proc.tokenizer if proc is not None else AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer from {folder} ({exc}).") from exc
    if not getattr(tok, "chat_template", None):
        # Base checkpoints often ship without a template; Gemma 4's own format is the right default.
        tok.chat_template = GEMMA4_CHAT_TEMPLATE
        if proc is not None:
            proc.chat_template = GEMMA4_CHAT_TEMPLATE
    return proc if proc is not None else tok


def freeze(model: nn.Module) -> None:
    """Every base parameter is frozen; adapters add the only trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)


def _load_full(cls, folder: Path, shards: list[Path], config: dict, dtype, device, quantize_family, offload: bool):
    """Stream the checkpoint (NF4 and PLE offload while reading; host memory near one tensor), or, for anything
    the streaming reader does not handle (pre-quantized, renamed keys), transformers' from_pretrained."""
    from slimtune.models.stream_load import stream_load, streamable  # noqa: PLC0415

    attn = attention_plan(cls)
    if streamable(config):
        model = stream_load(cls, folder, shards, dtype=dtype, device=device, attn_implementation=attn,
                            quantize_family=quantize_family, offload_ple=offload)
        if model is not None:
            return model
    warnings.warn(f"{folder}: checkpoint layout not streamable; loading through from_pretrained, which holds the "
                  "whole model in host memory before quantizing.", stacklevel=3)
    return cls.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn)


def load_model(name_or_path, *, dtype=None, load_in_4bit: bool = False, max_seq_length: int | None = None,
               device=None, offload_embeddings: bool | None = None, attention: str = "auto", text_only: bool = False):
    """Load a Gemma 4 checkpoint for fine-tuning.

    Args:
        name_or_path: local Hugging Face folder, a hub id (downloaded through huggingface_hub), or
            ``random:<e2b|e4b|26b-a4b|31b>`` for random weights of that real text geometry built on the device
            (benchmarks and smoke tests of a setup; no checkpoint on disk).
        dtype: weights/compute dtype ("bfloat16", "float16", "float32", a torch.dtype, or None for automatic).
        load_in_4bit: quantize frozen linear weights and MoE expert tensors to NF4 (bitsandbytes' format) while
            loading (QLoRA).
        max_seq_length: longest sequence you intend to train on; checked against the model's limit.
        device: "cuda", "cpu", … (default: CUDA when available).
        offload_embeddings: keep the per-layer-embedding table (E2B/E4B: 2.35/2.8 B parameters) in pinned host
            memory and copy only each batch's rows to the GPU. None = on for CUDA devices.
        attention: "auto" (slimtune's Triton kernel for the text decoder on CUDA, sdpa elsewhere), "slimtune",
            or "sdpa".

    Returns:
        (model, tokenizer) — the second value is the processor for multimodal checkpoints. The model is a plain
        transformers model with every parameter frozen.

    Raises:
        ModelLoadError: missing/corrupt files or an unreachable hub id.
        UnsupportedModelError: the checkpoint is not a supported family.
        ConfigError: bad dtype or max_seq_length.
    """
    if isinstance(name_or_path, str) and name_or_path.startswith(RANDOM_PREFIX):
        return load_random_model(name_or_path, dtype=dtype, load_in_4bit=load_in_4bit,
                                 max_seq_length=max_seq_length, device=device, offload_embeddings=offload_embeddings,
                                 attention=attention)
    folder = resolve_checkpoint(name_or_path)
    config = read_config(folder)
    family = family_for_model_type(config.get("model_type"))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    shards = check_weight_files(folder)
    if not isinstance(text_only, bool):
        raise ConfigError(f"text_only must be True or False, got {text_only!r}.")
    cls = model_class_for(config, family)
    text_only = text_only and cls.__name__ == family.multimodal_class
    text_cfg = config.get("text_config", config)
    limit = text_cfg.get("max_position_embeddings")
    if max_seq_length is not None and (max_seq_length <= 0 or (limit and max_seq_length > limit)):
        raise ConfigError(f"max_seq_length={max_seq_length} is outside this model's range 1..{limit}.")
    offload = offload_embeddings if offload_embeddings is not None else device.type == "cuda"
    quantize_family = family if load_in_4bit else None
    try:
        if text_only:
            from slimtune.models.text_only import load_language_model  # noqa: PLC0415

            model = load_language_model(folder, shards, dtype, device=device, quantize_family=quantize_family,
                                        offload_ple=offload)
        else:
            model = _load_full(cls, folder, shards, config, dtype, device, quantize_family, offload)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"transformers could not load {folder} as {cls.__name__}: {exc}") from exc
    freeze(model)
    if load_in_4bit and not any(is_nf4_linear(m) for m in model.modules()):  # from_pretrained fallback
        quantize_model_nf4(model, family, dtype, device)
    if load_in_4bit:  # a pre-quantized checkpoint: transformers' bitsandbytes loading leaves 3-D experts 16-bit
        quantize_experts_nf4(model, dtype, device)  # (no-op when streaming or quantize_model_nf4 did them)
        keep_standard_nf4_layout(model)  # transformers' Linear4bit modules too (see the function)
    if offload:
        from slimtune.memory.host_embedding import offload_per_layer_embeddings  # noqa: PLC0415

        offload_per_layer_embeddings(model)  # no-op after streaming; before .to(device) after from_pretrained
    model.to(device)
    from slimtune.adapt.precision import protect_audio_tower  # noqa: PLC0415

    protect_audio_tower(model)  # its -1e9 mask fill must never meet fp16 autocast
    _finish(model, device, attention, max_seq_length or limit, str(name_or_path), load_in_4bit, text_only)
    # text_only: the plain tokenizer; image/audio rows are refused by the data path (no towers to feed them to).
    tokenizer = load_tokenizer(folder, multimodal=cls.__name__ == family.multimodal_class and not text_only)
    return model, tokenizer


def load_random_model(spec: str, *, dtype=None, load_in_4bit: bool = False, max_seq_length: int | None = None,
                      device=None, offload_embeddings: bool | None = None, attention: str = "auto"):
    """``random:<geometry>``: random frozen weights of a real Gemma 4 text geometry, built straight on the device.

    Why: scale-out and memory measurements of 26B/31B need the real shapes, and writing then streaming a 62 GB
    random checkpoint per run costs minutes of GPU time for nothing; every process builds the same weights from
    the same seed instead. The tokenizer is the project's small built-in one (its ids fit any Gemma 4 vocabulary).
    """
    from slimtune.bench.random_model import build_random_model  # noqa: PLC0415 - bench imports this module
    from slimtune.models.geometry import VARIANTS  # noqa: PLC0415
    from slimtune.models.tokenizer_build import build_tokenizer  # noqa: PLC0415

    variant = spec[len(RANDOM_PREFIX):]
    if variant not in VARIANTS:
        raise ConfigError(f"{spec!r}: unknown geometry {variant!r}; use one of "
                          f"{', '.join(RANDOM_PREFIX + v for v in VARIANTS)}.")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    offload = offload_embeddings if offload_embeddings is not None else device.type == "cuda"
    model = build_random_model(variant, mode="qlora" if load_in_4bit else "lora16", device=device, dtype=dtype,
                               offload_ple=offload)
    limit = model.config.get_text_config().max_position_embeddings
    if max_seq_length is not None and not 0 < max_seq_length <= limit:
        raise ConfigError(f"max_seq_length={max_seq_length} is outside this model's range 1..{limit}.")
    _finish(model, device, attention, max_seq_length or limit, spec, load_in_4bit, False)
    return model, build_tokenizer()


def _finish(model, device: torch.device, attention: str, max_seq_length: int, source: str, load_in_4bit: bool,
            text_only: bool) -> None:
    """The attention choice, eval mode and the attributes training and export read (`slimtune_*`)."""
    if attention == "slimtune" or (attention == "auto" and device.type == "cuda"):
        from slimtune.adapt.attention import enable_slimtune_attention  # noqa: PLC0415

        enable_slimtune_attention(model)
    elif attention not in ("auto", "sdpa"):
        raise ConfigError(f"attention={attention!r} is not supported; use 'auto', 'slimtune' or 'sdpa'.")
    model.eval()
    model.slimtune_max_seq_length = max_seq_length
    model.slimtune_source = source
    model.slimtune_load_in_4bit = bool(load_in_4bit)
    model.slimtune_text_only = text_only
