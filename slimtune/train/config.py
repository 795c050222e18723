"""`TrainConfig`: every setting of a training run, validated all at once before any work starts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import ConfigError


@dataclass
class TrainConfig:
    """A fine-tuning run. Field names are the YAML keys and (with - for _) the CLI flags."""

    model: str = ""
    """Local Hugging Face folder or hub id of the base model."""
    data: str = ""
    """Dataset file or folder (see slimtune.data for formats)."""
    output: str = ""
    """Run folder: adapter/, metrics.jsonl, config.yaml, checkpoints/."""
    max_steps: int | None = None
    """Optimizer steps to run; None = as many as `epochs` needs."""
    epochs: float = 1.0
    """Passes over the data when max_steps is None."""
    lr: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """cosine | linear | constant (after warmup)."""
    warmup_steps: int | None = None
    """Linear warmup steps; None = 3% of the run (at least 1)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA alpha (update scaled by alpha/r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling alpha/sqrt(r)."""
    target_modules: str | list[str] = "all-linear"
    """"all-linear" or a list of linear names."""
    finetune_language_layers: bool = True
    finetune_vision_layers: bool = False
    finetune_audio_layers: bool = False
    finetune_multimodal_embedders: bool = False
    """LoRA on the projections that map vision/audio tower outputs into the text model (embed_vision/audio)."""
    text_only: bool = False
    """Multimodal checkpoint: load only the language model (towers never read); the adapter still fits the full
    model."""
    finetune_attention_modules: bool = True
    finetune_mlp_modules: bool = True
    finetune_experts: bool = False
    """MoE models (26B-A4B): LoRA on the fused expert tensors too (PEFT target_parameters); needs lora_dropout=0."""
    batch_size: int = 1
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_seq_length: int = 2048
    """Longer samples are truncated (and counted)."""
    load_in_4bit: bool = False
    """QLoRA: NF4 base weights."""
    dtype: str | None = None
    """bfloat16 | float16 | float32 | None (auto: bf16 on GPUs that have it, fp16 otherwise, fp32 on CPU)."""
    device: str | None = None
    """cuda | cpu | None (auto)."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant: correct with Gemma 4's KV sharing)."""
    checkpoint_layers: int | None = None
    """With gradient_checkpointing: how many decoder layers recompute (the first N; None = all). The rest keep
    their activations from the forward: less recompute per step, more memory (the estimate counts both)."""
    activation_offload: bool = False
    """Keep the inputs checkpointing saves per decoder layer in pinned host memory (async copies, prefetched
    for backward). Needs gradient_checkpointing."""
    compile_layers: bool = False
    """torch.compile each text decoder layer (fuses the elementwise work between matmuls; the first steps compile).
    Best with fixed shapes (cuda_graphs or packing): every new sequence length may compile again."""
    recompute_norms: bool = True
    """RMSNorms save their 16-bit input instead of an fp32 copy and recompute the normalisation in backward
    (slimtune.adapt.rms_norm): same outputs and gradients, about a quarter less memory per checkpointed layer. On by
    default since the fused CUDA kernels made it faster too (H200, E2B QLoRA 2K graphed: 12,676 -> 17,562 tok/s)."""
    cuda_graphs: bool | str = "auto"
    """Capture each optimizer step as one CUDA graph after two eager warm-up steps (slimtune.train.cuda_graph):
    several times faster on short sequences, whose steps are bound by host-side launches. Packed batches are
    padded to max_seq_length; unpacked ones to a length bucket (128, 192, 256, 384, ...), one captured step per
    bucket (slimtune.train.graph_buckets). With optimizer adamw8bit the update runs eagerly after each replayed
    forward and backward. Needs CUDA, bf16, lora_dropout 0, no activation_offload, text batches, and one process
    or distributed ddp (not fsdp).
    "auto": on when all that holds and the predicted peak plus a margin fits the memory the process can use
    (slimtune.train.auto_graphs; the run log says which and why); true forces it, false never."""
    mlp_chunk_size: int = 0
    """Run each decoder MLP over chunks of this many tokens, recomputing them in backward (0 = off)."""
    optimizer: str = "adamw"
    """adamw | adamw8bit (bitsandbytes' 8-bit AdamW: optimizer state in 1/4 of the memory)."""
    train_on: str = "assistant"
    """assistant (loss on replies only) | all."""
    chat_template: str = "auto"
    """auto (the tokenizer's own, Gemma 4's when it has none) | gemma4 | gemma4-thinking (slimtune's built-ins)."""
    tool_messages: str = "keep"
    """keep | reject: what to do with rows that contain tool/function turns."""
    image_max_soft_tokens: int | None = None
    """Image budget in soft tokens: 70 | 140 | 280 | 560 | 1120 (None = the checkpoint's processor default)."""
    seed: int = 0
    """Seeds adapter init, data order and dropout."""
    save_steps: int = 0
    """Write a checkpoint every K optimizer steps (0 = only at the end)."""
    log_every: int = 1
    """Print a progress line every N steps (metrics.jsonl always gets every step)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in output/checkpoints/ (fresh start if there is none)."""
    eval_data: str | None = None
    """Held-out dataset file for evaluation (same formats as data); exclusive with eval_fraction."""
    eval_fraction: float = 0.0
    """Fraction of the training samples split off (seeded shuffle) as the eval set; 0 = none."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps (0 = only at the end); needs an eval set."""
    early_stopping_patience: int = 0
    """Stop when the eval loss has not improved for N evaluations in a row (0 = never stop early)."""
    packing: bool = False
    """Pack several samples into each max_seq_length sequence (attention and loss kept inside each sample);
    batch_size then counts packed sequences."""
    loss_chunk_size: int = 0
    """Rows per chunk of the lm_head + cross-entropy (0 = automatic: 512 at Gemma 4's 262,144-token vocab)."""
    max_memory: str | None = None
    """GPU memory budget such as "8GiB", "8GB" or "8000MiB": the planner chooses the settings you left unset so
    the predicted peak fits (slimtune.memory.planner). Under torchrun (--nproc N) it is each GPU's budget."""
    distributed: str = "auto"
    """auto | ddp | fsdp: how processes started by torchrun (or --nproc) share the work. ddp (= auto) keeps a
    full model per GPU; fsdp shards the 16-bit weights and LoRA over the GPUs (FSDP2; with load_in_4bit the NF4
    weights behind a LoRA adapter are sharded too, other NF4 linears and MoE experts stay whole on every GPU)."""
    extra: dict = field(default_factory=dict)
    """Reserved for settings of later stages; must be empty for now."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise one ConfigError listing all problems."""
        p = []
        for name in ("model", "data", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                p.append(f"{name} is required (got {getattr(self, name)!r})")
        checks = [
            ("lora_r", isinstance(self.lora_r, int) and self.lora_r > 0, "a positive integer"),
            ("lora_alpha", isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "> 0"),
            ("lora_dropout", isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("lr", isinstance(self.lr, (int, float)) and self.lr > 0, "> 0"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size > 0, "a positive integer"),
            ("grad_accum", isinstance(self.grad_accum, int) and self.grad_accum > 0, "a positive integer"),
            ("max_seq_length", isinstance(self.max_seq_length, int) and self.max_seq_length > 1, "an integer > 1"),
            ("max_steps", self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps > 0),
             "a positive integer or null"),
            ("epochs", isinstance(self.epochs, (int, float)) and self.epochs > 0, "> 0"),
            ("warmup_steps", self.warmup_steps is None or (isinstance(self.warmup_steps, int)
                                                           and self.warmup_steps >= 0), ">= 0 or null"),
            ("weight_decay", isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, ">= 0"),
            ("max_grad_norm", isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0, ">= 0"),
            ("save_steps", isinstance(self.save_steps, int) and self.save_steps >= 0, ">= 0"),
            ("log_every", isinstance(self.log_every, int) and self.log_every > 0, "a positive integer"),
            ("seed", isinstance(self.seed, int), "an integer"),
            ("lr_scheduler", self.lr_scheduler in ("cosine", "linear", "constant"), "cosine, linear or constant"),
            ("train_on", self.train_on in ("assistant", "all"), "assistant or all"),
            ("chat_template", self.chat_template in ("auto", "gemma4", "gemma4-thinking"),
             "auto, gemma4 or gemma4-thinking"),
            ("tool_messages", self.tool_messages in ("keep", "reject"), "keep or reject"),
            ("image_max_soft_tokens", self.image_max_soft_tokens in (None, 70, 140, 280, 560, 1120),
             "one of 70, 140, 280, 560, 1120 or null"),
            ("resume", isinstance(self.resume, bool), "true or false"),
            ("text_only", isinstance(self.text_only, bool), "true or false"),
            ("finetune_multimodal_embedders", isinstance(self.finetune_multimodal_embedders, bool),
             "true or false"),
            ("finetune_experts", isinstance(self.finetune_experts, bool), "true or false"),
            ("eval_data", self.eval_data is None or (isinstance(self.eval_data, str) and self.eval_data != ""),
             "a dataset path or null"),
            ("eval_fraction", isinstance(self.eval_fraction, (int, float)) and not isinstance(self.eval_fraction, bool)
             and 0 <= self.eval_fraction < 1, "in [0, 1)"),
            ("eval_steps", isinstance(self.eval_steps, int) and self.eval_steps >= 0, ">= 0"),
            ("early_stopping_patience", isinstance(self.early_stopping_patience, int)
             and self.early_stopping_patience >= 0, ">= 0"),
            ("mlp_chunk_size", _non_negative_int(self.mlp_chunk_size), "an integer >= 0 (0 = off)"),
            ("loss_chunk_size", _non_negative_int(self.loss_chunk_size), "an integer >= 0 (0 = automatic)"),
            ("optimizer", self.optimizer in ("adamw", "adamw8bit"), "adamw or adamw8bit"),
            ("checkpoint_layers", self.checkpoint_layers is None or _non_negative_int(self.checkpoint_layers),
             "an integer >= 0 or null (all layers)"),
            ("activation_offload", isinstance(self.activation_offload, bool), "true or false"),
            ("cuda_graphs", isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "auto", "true, false or auto"),
            ("recompute_norms", isinstance(self.recompute_norms, bool), "true or false"),
            ("compile_layers", isinstance(self.compile_layers, bool), "true or false"),
            ("distributed", self.distributed in ("auto", "ddp", "fsdp"), "auto, ddp or fsdp"),
            ("dtype", self.dtype in (None, "auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"),
             "bfloat16, float16, float32 or null"),
        ]
        for name, ok, want in checks:
            if not ok:
                p.append(f"{name} must be {want} (got {getattr(self, name)!r})")
        p += self._eval_problems()
        if self.activation_offload is True and self.gradient_checkpointing is False:
            p.append("activation_offload needs gradient_checkpointing (it offloads the inputs checkpointing keeps "
                     "per decoder layer): turn gradient_checkpointing on or activation_offload off")
        if self.checkpoint_layers is not None and self.gradient_checkpointing is False:
            p.append("checkpoint_layers needs gradient_checkpointing (it says how many layers recompute): turn "
                     "gradient_checkpointing on or leave checkpoint_layers unset")
        p += self._cuda_graph_problems()
        if self.finetune_experts is True and self.lora_dropout:
            p.append(f"finetune_experts=true needs lora_dropout=0 (got {self.lora_dropout!r}): PEFT's LoRA on expert "
                     "tensors has no dropout and would refuse the adapter")
        p += _max_memory_problems(self.max_memory)
        if self.text_only is True:
            p += [f"{name}=true needs the towers, which text_only=true does not load; set one of them to false"
                  for name in ("finetune_vision_layers", "finetune_audio_layers", "finetune_multimodal_embedders")
                  if getattr(self, name) is True]
        p += _seq_length_problems(self.model, self.max_seq_length)
        if self.extra:
            p.append(f"unknown settings: {sorted(self.extra)}")
        if p:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(p))

    def _cuda_graph_problems(self) -> list[str]:
        if self.cuda_graphs is not True:
            return []
        clash = [(bool(self.lora_dropout), "lora_dropout=0"),
                 (self.activation_offload is True, "activation_offload off"),
                 (self.dtype in ("float16", "fp16"), "dtype bfloat16 (fp16's loss scaler syncs with the host)"),
                 (self.dtype in ("float32", "fp32"), "dtype bfloat16")]
        return [f"cuda_graphs=true needs {fix}; or turn cuda_graphs off" for bad, fix in clash if bad]

    def has_eval_set(self) -> bool:
        """True when an eval set is configured (eval_data or a positive eval_fraction)."""
        return bool(self.eval_data) or (isinstance(self.eval_fraction, (int, float)) and self.eval_fraction > 0)

    def _eval_problems(self) -> list[str]:
        # Settings that only make sense together; reported with what to set instead.
        p = []
        if self.eval_data and isinstance(self.eval_fraction, (int, float)) and self.eval_fraction > 0:
            p.append(f"eval_data ({self.eval_data!r}) and eval_fraction ({self.eval_fraction}) are mutually "
                     "exclusive: give a held-out file OR a fraction of the training data, not both")
        if not self.has_eval_set():
            for name in ("eval_steps", "early_stopping_patience"):
                value = getattr(self, name)
                if isinstance(value, int) and value > 0:
                    p.append(f"{name}={value} needs an eval set: set eval_data (a file) or eval_fraction "
                             "(e.g. 0.1)")
        return p

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]


def _seq_length_problems(model: str, max_seq_length) -> list[str]:
    """max_seq_length beyond the model's position limit, checked now when the model folder is local.

    Hub ids are checked later by load_model (their config is only known after the download).
    """
    cfg_path = Path(model) / "config.json" if isinstance(model, str) and model else None
    if cfg_path is None or not cfg_path.is_file() or not isinstance(max_seq_length, int):
        return []
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return []  # load_model reports an unreadable config.json with its own message
    text_cfg = config.get("text_config") or config  # multimodal checkpoints keep the limit in text_config
    limit = text_cfg.get("max_position_embeddings")
    if isinstance(limit, int) and max_seq_length > limit:
        return [f"max_seq_length must be at most {limit}, the position limit (max_position_embeddings) of "
                f"{model} (got {max_seq_length}); lower max_seq_length"]
    return []


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _max_memory_problems(max_memory) -> list[str]:
    if max_memory is None:
        return []
    from slimtune.memory.sizes import parse_memory_size  # noqa: PLC0415

    try:
        parse_memory_size(max_memory)
    except ConfigError as exc:
        return [str(exc)]
    return []
