"""Request and response models of the Studio API (they also drive the OpenAPI docs at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "completed", "failed", "stopped", "interrupted"]
_ID = Field(pattern=r"^[a-z0-9]{6,32}$", description="Id as returned by the list endpoints.")


class Detail(BaseModel):
    """Error body of every non-2xx answer."""

    detail: str


# ---- auth ----------------------------------------------------------------------------------------
class LoginRequest(BaseModel):
    password: str = Field(max_length=1024)


class AuthStatus(BaseModel):
    auth_required: bool
    authenticated: bool


class StudioInfo(BaseModel):
    auth_required: bool
    max_upload_mb: int
    running: str | None = Field(description="'runs/<id>' or 'exports/<id>' of the job using the GPU now.")


# ---- models --------------------------------------------------------------------------------------
class ModelInfo(BaseModel):
    id: str
    kind: Literal["tiny", "local", "hub"]
    name: str
    ref: str = Field(description="What is passed to --model: a folder path or a hub id.")
    ready: bool = Field(description="False for the embedded tiny model until it has been written to disk.")
    created_at: float | None = None


class RegisterModelRequest(BaseModel):
    kind: Literal["local", "hub"]
    ref: str = Field(min_length=1, max_length=1024, description="Absolute folder path, or a hub id like org/name.")
    name: str | None = Field(default=None, max_length=100)


# ---- datasets ------------------------------------------------------------------------------------
class DatasetInfo(BaseModel):
    id: str
    name: str
    filename: str
    size_bytes: int
    created_at: float


class SkippedRow(BaseModel):
    location: str | int
    reason: str


class DatasetPreview(BaseModel):
    dataset: DatasetInfo
    format: str
    columns: list[str]
    n_rows: int
    n_skipped: int
    skipped: list[SkippedRow]
    preview: list[Any]


# ---- runs ----------------------------------------------------------------------------------------
# Field names are TrainConfig's (slimtune/train/config.py). Values here are only type- and size-checked: the run and
# the estimate hand them to TrainConfig itself, so the Studio accepts exactly what `slimtune train` accepts and
# reports its messages. A None (or False for a switch) means "not given", as a flag left off the command line: the
# trainer's default applies, or, with max_memory, the planner's choice.
# `distributed` (ddp | fsdp) is deliberately absent: it only acts on processes started by torchrun, and the Studio
# launches one worker process per run.
class TrainSettings(BaseModel):
    """The settings that decide a run's GPU memory; shared by the run form and the memory estimate."""

    model_id: str = _ID
    lora_r: int = Field(default=16, ge=1, le=1024)
    batch_size: int = Field(default=1, ge=1, le=4096)
    grad_accum: int = Field(default=4, ge=1, le=4096)
    max_seq_length: int = Field(default=2048, ge=8, le=1_048_576)
    load_in_4bit: bool = False
    max_memory: str | None = Field(default=None, max_length=32, examples=["8GiB"],
                                   description="GPU memory budget such as 8GiB, 8GB or 8000MiB: the planner chooses "
                                               "the memory settings left unset so the predicted peak fits.")
    activation_offload: bool = Field(default=False, description="Keep checkpointed layer inputs in pinned host "
                                                                "memory: less GPU memory, a small speed cost.")
    recompute_norms: bool = Field(default=True, description="RMSNorms keep their 16-bit input instead of an fp32 "
                                                            "copy: less memory per layer, same results, faster.")
    cuda_graphs: bool | None = Field(default=None, description="Capture each step as one CUDA graph: several "
                                     "times faster on short sequences; packed batches are padded to max_seq_length, "
                                     "others to a length bucket (one graph each); no activation offload. "
                                     "None = auto: on when the run allows it and the predicted peak "
                                     "plus a margin (1.5 GiB or 7 %) fits the GPU's free memory.")
    packing: bool = Field(default=False, description="Pack several samples into each max_seq_length row (no "
                                                     "attention or loss across samples): no padding, fixed shapes.")
    compile_layers: bool = Field(default=False, description="torch.compile each decoder layer: faster steps after a "
                                                            "compile of a minute or two; best with fixed shapes. "
                                                            "With cuda_graphs it also shrinks the graph's memory.")
    mlp_chunk_size: int | None = Field(default=None, strict=True, description="Tiled MLP: tokens per chunk (0 = off); less "
                                                                 "memory on long sequences, slower.")
    optimizer: str | None = Field(default=None, max_length=32,
                                  description="adamw | adamw8bit (optimizer state in a quarter of the memory).")
    loss_chunk_size: int | None = Field(default=None, strict=True, description="Rows per lm_head + loss chunk (0 = automatic).")


class TrainConfig(TrainSettings):
    """Settings of one training run; each maps onto the `slimtune train` flag of the same name."""

    dataset_id: str = _ID
    name: str | None = Field(default=None, max_length=100, description="Display name; defaults to the id.")
    max_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    epochs: float | None = Field(default=None, gt=0, le=1000)
    lr: float = Field(default=2e-4, gt=0, le=1)
    lora_alpha: int = Field(default=32, ge=1, le=4096)
    seed: int = Field(default=3407, ge=0, le=2**31 - 1)
    save_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    text_only: bool = Field(default=False, description="Multimodal checkpoint: load only the language model.")
    finetune_multimodal_embedders: bool = Field(
        default=False, description="LoRA on the projections from the vision/audio towers into the text model.")


class RunInfo(BaseModel):
    id: str
    name: str
    status: JobStatus
    model_id: str
    model_ref: str
    dataset_id: str
    config: TrainConfig
    created_at: float
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    error: str | None
    resume_count: int
    queue_position: int | None
    has_adapter: bool
    last_step: int | None
    last_loss: float | None


class MetricsResponse(BaseModel):
    metrics: list[dict[str, Any]] = Field(description="One object per optimizer step, as the trainer wrote it.")
    events: list[dict[str, Any]] = Field(description="Lines with an 'event' key (e.g. checkpoint saved).")
    offset: int = Field(description="Byte offset to pass as ?offset= to get only newer lines.")


class LogResponse(BaseModel):
    lines: list[str]


class ArtifactFile(BaseModel):
    path: str
    size_bytes: int


# ---- memory --------------------------------------------------------------------------------------
class MemoryRequest(TrainSettings):
    """The run form's memory settings; answered with what `slimtune train` would predict or plan for them."""


class MemoryTerm(BaseModel):
    name: str
    gib: float


class MemoryEstimate(BaseModel):
    """The planner's prediction for the settings (no budget), or the plan it chose for the budget."""

    total_gib: float = Field(description="Predicted peak GPU memory (of the smallest plan when nothing fits).")
    breakdown: dict[str, float] = Field(description="Every term of the prediction, GiB.")
    main_terms: list[MemoryTerm] = Field(description="The largest terms, largest first.")
    phase: str = Field(description="Where the peak falls: 'loss' or 'backward'.")
    budget_gib: float | None = Field(description="max_memory in GiB, when one was given.")
    fits: bool = Field(description="True without a budget, or when the plan fits it.")
    planned: dict[str, bool | int | str] = Field(
        description="Settings the planner filled in (only with a budget): name -> value the run will use.")
    settings: dict[str, bool | int | str] = Field(description="Every memory setting the run would use.")
    notes: list[str]
    message: str | None = Field(description="Why nothing fits the budget (with the longest context that does).")
    longest_seq_length: int | None = Field(description="Longest max_seq_length that fits, when nothing else does.")
    summary: str = Field(description="The lines `slimtune train` prints about memory before it starts.")


# ---- chat ----------------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class GenerationParams(BaseModel):
    max_new_tokens: int = Field(default=256, ge=1, le=32_768)
    temperature: float = Field(default=0.7, ge=0, le=5)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=64, ge=0, le=100_000)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    stop: list[str] = Field(default_factory=list, max_length=16)


class ChatRequest(BaseModel):
    """One turn for one side; the browser sends one request per side and shows both streams."""

    run_id: str = _ID
    side: Literal["base", "adapter"]
    messages: list[ChatMessage] = Field(min_length=1, max_length=500)
    params: GenerationParams = Field(default_factory=GenerationParams)


class ChatStatus(BaseModel):
    loaded: dict[str, Any] | None = Field(description="What the chat worker holds in memory, if anything.")
    busy: bool


# ---- export --------------------------------------------------------------------------------------
class ExportFormat(BaseModel):
    name: str
    description: str


class ExportRequest(BaseModel):
    run_id: str = _ID
    format: str = Field(min_length=1, max_length=64)


class ExportInfo(BaseModel):
    id: str
    run_id: str
    format: str
    status: JobStatus
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    queue_position: int | None
    download_ready: bool
