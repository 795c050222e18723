"""`TrainConfig`: every setting of a training run, validated all at once before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
    finetune_attention_modules: bool = True
    finetune_mlp_modules: bool = True
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
    train_on: str = "assistant"
    """assistant (loss on replies only) | all."""
    seed: int = 0
    """Seeds adapter init, data order and dropout."""
    save_steps: int = 0
    """Write a checkpoint every K optimizer steps (0 = only at the end)."""
    log_every: int = 1
    """Print a progress line every N steps (metrics.jsonl always gets every step)."""
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
            ("dtype", self.dtype in (None, "auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"),
             "bfloat16, float16, float32 or null"),
        ]
        for name, ok, want in checks:
            if not ok:
                p.append(f"{name} must be {want} (got {getattr(self, name)!r})")
        if self.extra:
            p.append(f"unknown settings: {sorted(self.extra)}")
        if p:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(p))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
