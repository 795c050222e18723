"""Write tiny random Gemma 4 checkpoints: real transformers folders, built in-process, no downloads.

``write_tiny_model`` produces what a released checkpoint folder holds (``config.json``, safetensors
weights, ``generation_config.json``, the tokenizer and, for multimodal models, the processor), only tiny
and randomly initialised, so every slimtune code path can be exercised on a CPU in seconds. Plain
transformers loads the folder back (``AutoModelForCausalLM`` / ``AutoModelForImageTextToText``,
``AutoTokenizer``, ``AutoProcessor``) with no slimtune code involved.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, PreTrainedModel

from slimtune.errors import ConfigError
from slimtune.models.geometry import TINY_SIZES, VARIANTS, build_config
from slimtune.models.tokenizer_build import PROCESSOR_CLASS, SPECIAL_TOKENS, build_tokenizer, processor_config_dict


def build_tiny_model(
    *, variant: str = "e2b", text_only: bool = False, seed: int = 0, size: str = "test"
) -> PreTrainedModel:
    """Build a tiny random Gemma 4 model in memory (fp32), deterministically from ``seed``.

    Args:
        variant: One of ``VARIANTS`` ("e2b", "e4b", "26b-a4b", "31b"); the tiny model keeps its structure.
        text_only: ``Gemma4ForCausalLM`` instead of ``Gemma4ForConditionalGeneration`` with towers.
        seed: Seeds the weight initialisation; the caller's global RNG state is left untouched.
        size: "test" (smallest, ~2 M parameters) or "demo" (~5-6 M, for the README demo).

    Returns:
        The model in eval mode, with a ``generation_config`` whose eos ids include ``<turn|>``.

    Raises:
        ConfigError: Unknown variant or size.
    """
    tokenizer_vocab = len(build_tokenizer())
    config = build_config(variant, tiny=True, text_only=text_only, size=size, vocab_size=tokenizer_vocab)
    model_class = Gemma4ForCausalLM if text_only else Gemma4ForConditionalGeneration
    previous_dtype = torch.get_default_dtype()
    # fork_rng: seeding must not change the random stream of whoever called us (tests, training scripts).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)  # init in fp32 whatever the caller's default is
        try:
            # Default init keeps `layer_scalar` at 1 and the clip bounds of clipped linears at +-inf.
            model = model_class(config)
            if size == "demo":
                # A trained Gemma's tied embedding rows are long enough for confident logits. With the default
                # init (std 0.02) and a frozen final norm, a tiny random model's logits stay within about
                # +-2.5, which caps how far LoRA can lower the loss (~4.7 nats even when overfitting one batch).
                # Rows of norm ~1.2 let the demo's LoRA fine-tune learn visibly, as on a real checkpoint.
                # ("test" keeps the default: its small logits keep fp32 parity checks at 1e-5 meaningful.)
                with torch.no_grad():
                    emb = model.get_input_embeddings().weight
                    emb.normal_(0.0, 1.2 / config.get_text_config().hidden_size ** 0.5)
        finally:
            torch.set_default_dtype(previous_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=SPECIAL_TOKENS["<bos>"],
        pad_token_id=SPECIAL_TOKENS["<pad>"],
        # A chat answer ends with <turn|>; plain text generation ends with <eos>.
        eos_token_id=[SPECIAL_TOKENS["<eos>"], SPECIAL_TOKENS["<turn|>"]],
    )
    return model.eval()


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir={str(out_dir)!r} is a file; pass a folder path for the tiny model.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"out_dir={str(out_dir)!r} already exists and is not empty; pass overwrite=True to replace it "
            "or choose a new folder."
        )


def _swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished temp folder to ``out_dir``; an existing folder is removed only after the move."""
    if not out_dir.exists():
        tmp_dir.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{tmp_dir.name}")
    out_dir.rename(old)
    try:
        tmp_dir.rename(out_dir)
    except OSError:
        old.rename(out_dir)  # put the previous folder back before reporting the failure
        raise
    shutil.rmtree(old)


def write_tiny_model(
    out_dir: str | Path,
    *,
    variant: str = "e2b",
    text_only: bool = False,
    seed: int = 0,
    size: str = "test",
    overwrite: bool = False,
) -> Path:
    """Write a tiny random Gemma 4 checkpoint folder that plain transformers can load offline.

    The folder is written into a temporary sibling of ``out_dir`` and renamed into place at the end, so an
    interrupted call never leaves a half-written model behind.

    Args:
        out_dir: Folder to create (parents are created as needed).
        variant: One of ``VARIANTS``.
        text_only: Write a ``Gemma4ForCausalLM`` text model instead of the multimodal model.
        seed: Weight-initialisation seed (same seed, same weights on the same torch version).
        size: "test" or "demo" (see ``build_tiny_model``).
        overwrite: Replace ``out_dir`` if it already exists and is not empty.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ConfigError: Unknown variant/size, ``out_dir`` is a file, or it is a non-empty folder and
            ``overwrite`` is false.

    Example:
        >>> path = write_tiny_model("/tmp/tiny-e2b", text_only=True, overwrite=True)
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(path)
    """
    if variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r} is not a Gemma 4 variant; use one of {', '.join(VARIANTS)}.")
    if size not in TINY_SIZES:
        raise ConfigError(f"size={size!r} is not a tiny size; use one of {', '.join(TINY_SIZES)}.")
    out_dir = Path(out_dir).expanduser().absolute()
    _check_target(out_dir, overwrite)

    model = build_tiny_model(variant=variant, text_only=text_only, seed=seed, size=size)
    tokenizer = build_tokenizer()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir)  # transformers 5 always writes safetensors
        if not text_only:
            # Written from plain dicts rather than Gemma4Processor.save_pretrained, which needs torchvision:
            # the folder is the same with or without it, and AutoProcessor loads it wherever torchvision is.
            tokenizer._set_processor_class(PROCESSOR_CLASS)
            processor_json = json.dumps(processor_config_dict(model.config), indent=2, sort_keys=True)
            (tmp_dir / "processor_config.json").write_text(processor_json + "\n", encoding="utf-8")
        tokenizer.save_pretrained(tmp_dir)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        _check_target(out_dir, overwrite)  # re-check: another process may have written there meanwhile
        _swap_into_place(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


__all__ = ["build_tiny_model", "write_tiny_model"]
