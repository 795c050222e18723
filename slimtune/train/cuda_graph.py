"""One optimizer step captured as a CUDA graph and replayed: forward, backward, clip and AdamW in one launch.

Why: eagerly, a step of E2B launches 20-35 K host-side ops; at 2K tokens the H200 then waits on the CPU most of the
step (BENCHMARKS.md: GPU busy 20-50 %). Replaying a captured graph costs one launch, so short-sequence steps run at
the GPU's speed. Long sequences gain little: their step is GPU-bound already.

What capture requires, and how it is provided here:

* Static shapes and inputs: every batch has the first batch's shapes (``cuda_graphs`` training pads or packs to
  a fixed length); each step's batch is copied into device buffers the graph reads. Host-offloaded embedding rows
  (the PLE table) are gathered on the CPU into one of two pinned staging buffers and copied into a device buffer
  the graph reads (``HostOffloadedEmbedding.bind_static_rows``): the CPU gather is not part of the graph.
* No host sync inside: the loss scale ``1/N_targets`` is a device scalar; the loss scores every row, weighting
  ignored ones by 0 (``linear_cross_entropy(static_shapes=True)``); labels are range-checked on the host; the clip
  norm stays on the device; AdamW is fused and capturable with a tensor learning rate. The attention mask is
  dropped: batches must be right-padded, and with causal attention a real token never sees a later pad.
* No RNG in recomputation: checkpointing is switched to ``preserve_rng_state=False``, which is only allowed
  because nothing random runs (no dropout; checked).
* Gradients, one micro-batch per step: ``None`` when the graph is captured, so autograd writes them into graph
  memory and every replay overwrites them. With gradient accumulation (a list of micro-batches per step) there
  are two graphs instead: the micro-batch graph, captured while the gradients exist (zeros), so its backward adds
  into them in place, replayed once per micro-batch; and the update graph (clip, AdamW, zero the gradients in
  place), replayed once per step. The loss scale ``1/N_window`` covers the whole window, as in the eager step.
  Several steps training the same parameters (one per length bucket, slimtune.train.graph_buckets) never set
  the gradients to None: each step zeroes them in place when it is done (``shared_grads``).
* Optimizers that cannot be captured (8-bit AdamW: bitsandbytes passes the step count and learning rate to its
  kernels as host numbers, which a graph would freeze) step eagerly after the graph: forward and backward are the
  micro-batch graph, as under accumulation, and clip + step + zeroing run as ordinary launches (a few hundred, not
  the ~20 K of the forward and backward). Why: 8-bit AdamW is what fits 26B-A4B and 31B on a 24 GB card, and their
  eager steps leave the GPU idle most of the time (26B-A4B: busy 31 %).

* Data parallelism (DDP; the model fits each GPU): no DistributedDataParallel wrapper, whose reducer is driven
  by Python hooks. Each rank scales its loss by 1/N_global (the window's target tokens summed over ranks on the
  host), and the graph sums the gradients and the loss over ranks with one all-reduce of a flat buffer before
  the clip (``rank_sum``; NCCL collectives can be captured), so every rank applies the same update.

The first ``warmup`` steps run eagerly (Triton/cuBLAS/bitsandbytes initialise, kernels compile), on a side stream as
capture requires; they are real training steps. ``capture=False`` runs every step that eager way, with the same
static-buffer plumbing, so CPU tests check the plumbing against the standard step.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from slimtune.adapt.experts import graph_capture_problems
from slimtune.data.collate import count_targets
from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.errors import ConfigError
from slimtune.memory.host_embedding import host_tables
from slimtune.train.loss import loss_sum
from slimtune.train.step import autocast

_GRAPH_INPUTS = ("input_ids", "targets", "position_ids")  # position_ids: packed batches (document bounds)
_HOST_ONLY = ("attention_mask", "token_mask")  # checked / counted on the host, not read by the graph


def graph_step_problems(model: nn.Module, *, dtype: torch.dtype, scaler=None,
                        activation_offload: bool = False, distributed: bool = False,
                        capture: bool = True, device: torch.device | str | None = None) -> list[str]:
    """Why this configuration cannot run as a captured CUDA graph (empty list: it can).

    `distributed`: the run shards the model (FSDP2); data parallelism with whole models is captured.
    `device`: where the step runs (default: where the model's first parameter is); MoE blocks are checked for it.
    """
    problems = []
    if dtype == torch.float16 or scaler is not None:
        problems.append("fp16 needs a GradScaler, whose overflow check syncs with the host: use bfloat16")
    if activation_offload:
        problems.append("activation_offload copies on side streams with host events: turn one of them off")
    if distributed:
        problems.append("FSDP2 (sharded) runs: their gradient reduce-scatter is not captured; use distributed: "
                        "ddp")
    dropouts = [n for n, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if dropouts:
        problems.append(f"dropout is active ({dropouts[0]} p>0; e.g. lora_dropout): set it to 0")
    on = torch.device(device) if device is not None else next(model.parameters()).device
    if capture or on.type == "cuda":  # eager off-GPU runs (CPU tests) may route any way
        problems += graph_capture_problems(model, dtype, on)
    if getattr(model.config, "vision_config", None) is not None or getattr(model.config, "audio_config", None):
        problems.append("multimodal models: media inputs change shape per batch (text_only=True / --text-only)")
    return problems


def captures_update(optimizer) -> bool:
    """Whether the optimizer step can run inside the graph: torch AdamW built fused and capturable (optimizer adamw
    with cuda_graphs). Any other optimizer steps eagerly after the graph (module docstring)."""
    return (isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("capturable"))
            and bool(optimizer.defaults.get("fused")))


def require_graph_step(model: nn.Module, *, dtype: torch.dtype, capture: bool = True,
                       device: torch.device | str | None = None) -> None:
    """Raise ConfigError listing every `graph_step_problems` (and a non-CUDA `device` when capturing)."""
    problems = graph_step_problems(model, dtype=dtype, capture=capture, device=device)
    if capture and device is not None and torch.device(device).type != "cuda":
        problems.append(f"CUDA graphs need a CUDA device, got {device}")
    if problems:
        raise ConfigError("cuda_graphs cannot be used here:\n  - " + "\n  - ".join(problems))


def _checkpoint_without_rng(model: nn.Module) -> None:
    """Re-enable non-reentrant checkpointing without RNG-state saving (the state read is a host sync), for the same
    layers as before (``checkpoint_layers`` recomputes a prefix of the decoder layers)."""
    decoder = model.get_decoder().layers
    # the layers' own flags: transformers' model-level property was renamed (is_activation_checkpointing, 5.2x)
    recomputing = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in decoder)
    if not recomputing:
        return
    from slimtune.train.run import enable_checkpointing  # noqa: PLC0415 - run imports the loop, which imports this

    enable_checkpointing(model, None if recomputing == len(decoder) else recomputing, preserve_rng_state=False)


class GraphedTrainStep:
    """``step(cpu_batch) -> (loss, grad_norm)`` as device tensors; see the module docstring.

    Args:
        model: the (LoRA-adapted) model on CUDA; its host tables and checkpointing are switched to graph mode.
        params: the trainable parameters (clipped together). optimizer: over them; a capturable fused torch
            AdamW steps inside the graph, any other eagerly after it (`captures_update`).
        example: a CPU batch of the fixed shapes (input_ids, targets; an all-ones or right-padding attention_mask
            is accepted and dropped).
        max_grad_norm: clip threshold (0 = no clipping; the norm is still computed for the metrics).
        warmup: eager steps before capture. capture: False runs every step eagerly (CPU tests).
        pool: a graph memory pool (``torch.cuda.graph_pool_handle()``) shared with other steps' graphs; None gives
            this step's graphs their own.
        warmup_stream: the CUDA stream warm-up steps run on (shared by steps that take turns; None: one of its
            own). One stream for all of them, because the allocator caches freed blocks per stream.
        eager_update: replay forward and backward only and step the optimizer eagerly after them (None: when
            capturing with an optimizer that `captures_update` refuses).
        shared_grads: several steps train the same parameters (slimtune.train.graph_buckets): gradients are never
            set to None (another step's graph writes into them) and every step zeroes them in place when done, so
            each graph's backward adds onto zeros whichever step ran before.
        rank_sum: a slimtune.train.rank_sum.RankSum under data parallelism: target counts and gradients are
            summed over ranks (module docstring); None in one process.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], optimizer, example: dict, *,
                 device: torch.device, dtype: torch.dtype, max_grad_norm: float = 0.0, warmup: int = 2,
                 capture: bool = True, pool=None, shared_grads: bool = False, warmup_stream=None,
                 eager_update: bool | None = None, rank_sum=None) -> None:
        require_graph_step(model, dtype=dtype, capture=capture, device=device)
        self.model, self.params, self.optimizer = model, params, optimizer
        self.device, self.dtype = torch.device(device), dtype
        self.limit = max_grad_norm if max_grad_norm > 0 else math.inf
        self.warmup, self.capture = max(1, warmup), capture
        self.pool, self.shared_grads, self.warmup_stream = pool, shared_grads, warmup_stream
        self.rank_sum = rank_sum
        if eager_update is None:  # uncaptured (CPU tests): the one-graph structure unless asked otherwise
            eager_update = capture and not captures_update(optimizer)
        self.update_captured = not eager_update
        self.kept: dict[str, object] = {}  # graph-owned tensors no output holds (found_inf): never freed to the pool
        self.keys = [k for k in _GRAPH_INPUTS if k in example]
        self.shapes = {k: tuple(example[k].shape) for k in self.keys}
        self.static = {k: torch.zeros(self.shapes[k], dtype=torch.long, device=self.device) for k in self.keys}
        self.loss_scale = torch.zeros((), dtype=torch.float32, device=self.device)
        self.vocab = model.config.get_text_config().vocab_size
        n_tokens = example["input_ids"].numel()
        self.tables = host_tables(model)
        self.rows, self.staging, self.copied = [], [], []
        pin = self.device.type == "cuda"
        for table in self.tables:
            rows = torch.empty((n_tokens, table.embedding_dim), dtype=table.host_weight.dtype, device=self.device)
            table.bind_static_rows(rows)
            self.rows.append(rows)
            self.staging.append([torch.empty(rows.shape, dtype=rows.dtype, pin_memory=pin) for _ in range(2)])
            self.copied.append([None, None])
        model.slimtune_static_loss = True
        _checkpoint_without_rng(model)
        # captured graphs by name ("step"; or "micro" and "update" under gradient accumulation) and their outputs
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.graph_outputs: dict[str, object] = {}
        self.window_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        self.steps = self.loads = 0
        self.accumulating: bool | None = None  # fixed by the first call

    def close(self) -> None:
        """Leave graph mode: host tables gather per call again and the loss drops ignored rows again."""
        self._bind(False)
        self.graphs.clear()
        self.graph_outputs.clear()
        self.kept.clear()
        if hasattr(self.optimizer, "found_inf"):  # a graph-owned tensor: later eager steps must not read it
            del self.optimizer.found_inf

    def _bind(self, on: bool) -> None:
        for table, rows in zip(self.tables, self.rows):
            table.bind_static_rows(rows if on else None)
        self.model.slimtune_static_loss = on

    @contextlib.contextmanager
    def paused(self):
        """Run other forwards (evaluation, generation) on the model in between steps, with its per-call paths."""
        self._bind(False)
        try:
            yield
        finally:
            self._bind(True)

    def _check(self, cpu_batch: dict) -> None:
        if set(self.keys) != {k for k in cpu_batch if k in _GRAPH_INPUTS}:
            raise ConfigError(f"cuda_graphs: batch keys {sorted(cpu_batch)} differ from the captured step's "
                              f"{self.keys}")
        for k in self.keys:
            if tuple(cpu_batch[k].shape) != self.shapes[k]:
                raise ConfigError(f"cuda_graphs: batch {k} has shape {tuple(cpu_batch[k].shape)}, the captured step "
                                  f"{self.shapes[k]}: pad every batch to one length (max_seq_len) or turn it off")
        mask = cpu_batch.get("attention_mask")
        if mask is not None and not bool((mask.cummin(dim=-1).values == mask).all()):
            raise ConfigError("cuda_graphs needs right-padded batches (padding after the tokens of each row)")
        extra = set(cpu_batch) - set(_GRAPH_INPUTS) - set(_HOST_ONLY)
        if extra:
            raise ConfigError(f"cuda_graphs supports text batches only; this batch also has {sorted(extra)}")
        targets = cpu_batch["targets"]
        kept = targets[targets != IGNORE_INDEX]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= self.vocab):
            raise ConfigError(f"labels outside [0, {self.vocab}) in the batch: does the tokenizer match the model?")

    def _load(self, cpu_batch: dict) -> None:
        """Copy the batch into the static buffers (in stream order after the previous replay)."""
        for k in self.keys:
            src = cpu_batch[k]
            if self.device.type == "cuda" and not src.is_pinned():
                src = src.pin_memory()
            self.static[k].copy_(src, non_blocking=True)
        ids = cpu_batch["input_ids"].reshape(-1)
        slot = self.loads % 2
        self.loads += 1
        for i, table in enumerate(self.tables):
            done = self.copied[i][slot]
            if done is not None:
                done.synchronize()  # the copy out of this staging buffer, two steps ago, has finished
            staging = self.staging[i][slot]
            torch.index_select(table.host_weight, 0, ids, out=staging)
            self.rows[i].copy_(staging, non_blocking=True)
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                self.copied[i][slot] = event

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self._micro(accumulate=False)
        self._sum_over_ranks(loss)
        # alone, grads are None at capture and each replay overwrites them; shared, they are zeroed for the next step
        return loss, self._update(zero=self.shared_grads)

    def _window_update(self) -> torch.Tensor:
        self._sum_over_ranks(self.window_loss)
        return self._update()

    def _sum_over_ranks(self, loss: torch.Tensor) -> None:
        """Data parallel: sum the gradients and the loss over ranks in place, in one all-reduce of a flat buffer.
        Each rank's loss was scaled by 1/N_global, so the sums are the whole window's mean gradient and loss.
        Parameters without a gradient (not used by the model) stay without one, as in one process."""
        if self.rank_sum is None:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not self.rank_sum.checked:  # the run's first step, eager on every rank: a host collective is safe
            self.rank_sum.check_same(len(grads), sum(g.numel() for g in grads))
        self.rank_sum.sum_([*grads, loss])

    def _micro(self, accumulate: bool = True) -> torch.Tensor:
        """Forward and backward of the micro-batch in the static buffers; gradients accumulate."""
        with autocast(self.device, self.dtype):
            loss = loss_sum(self.model, self.static) * self.loss_scale
        loss.backward()
        if accumulate:
            self.window_loss.add_(loss.detach())
        return loss.detach()

    def _update(self, zero: bool = True) -> torch.Tensor:
        """Clip, step (skipping non-finite gradients) and, with `zero`, zero the gradients in place for the next
        window; returns the pre-clip norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.limit, foreach=self.device.type == "cuda")
        if self.optimizer.defaults.get("fused"):
            # The fused AdamW skips its update (and step count) where found_inf is set: a NaN/inf gradient is
            # never applied, without a host sync (slimtune.train.guard counts such steps)
            self.optimizer.found_inf = (~torch.isfinite(norm)).to(torch.float32)
            self.optimizer.step()
        elif bool(torch.isfinite(norm)):  # uncaptured only (capture needs the fused AdamW): a host check is fine
            self.optimizer.step()
        if zero:
            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        return norm.detach()

    def __call__(self, batches: dict | list[dict]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Train on one batch, or on a window of micro-batches (gradient accumulation); returns (loss of the
        window, pre-clip grad norm) as device tensors and the window's target count."""
        window = [batches] if isinstance(batches, dict) else list(batches)
        for b in window:
            self._check(b)
        self._bind(True)  # the host-table rows this step's graphs read (several steps may take turns)
        # an optimizer that cannot be captured needs the window structure: graphed micro-batches, eager update
        accumulating = len(window) > 1 or not self.update_captured
        if self.accumulating is None:
            self.accumulating = accumulating
        if accumulating and not self.accumulating:
            raise ConfigError("cuda_graphs: this step was captured for one micro-batch per step, not a window")
        n = sum(count_targets(b) for b in window)
        if self.rank_sum is not None:  # every rank's loss is scaled by the window's targets on ALL ranks
            n = int(self.rank_sum.host([n])[0])
        self.loss_scale.fill_(1.0 / max(n, 1))
        eager = not self.capture or self.steps < self.warmup
        with self._side_stream() if eager and self.capture else contextlib.nullcontext():
            if self.accumulating:  # the micro-batch graph once per micro-batch, then the update graph
                self.window_loss.zero_()
                for batch in window:
                    self._load(batch)
                    self._run("micro", self._micro, eager)
                loss, norm = self.window_loss, self._run("update", self._window_update,
                                                         eager or not self.update_captured)
            else:
                self._load(window[0])
                loss, norm = self._run("step", self._body, eager)
                if eager and not self.shared_grads:
                    self.optimizer.zero_grad(set_to_none=True)  # None when captured: see _body
        self.steps += 1
        return loss, norm, n

    def _run(self, name: str, fn, eager: bool):
        """fn() itself when eager (warm-up, or no capture); else the graph `name`, captured on first use (capture
        only records the work, so it is replayed right away as well)."""
        if eager:
            return fn()
        if name not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: NCCL's watchdog thread polls its events while this thread captures
                mode = "thread_local" if self.rank_sum is not None else "global"
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=mode):
                    self.graph_outputs[name] = fn()
                self.kept[name] = getattr(self.optimizer, "found_inf", None)
            except torch.OutOfMemoryError as exc:  # the trainer's out-of-memory advice applies (train.run)
                raise torch.OutOfMemoryError(f"while capturing the training step as a CUDA graph: {exc}") from exc
            except RuntimeError as exc:  # an op this GPU/driver/torch cannot capture: say how to train anyway
                raise RuntimeError(f"capturing the training step as a CUDA graph failed ({exc}). Train with "
                                   "--no-cuda-graphs (cuda_graphs: false): the eager step computes the same run. "
                                   "cuda_graphs is on by default (auto).") from exc
            self.graphs[name] = graph
        self.graphs[name].replay()
        return self.graph_outputs[name]

    @contextlib.contextmanager
    def _side_stream(self):
        """Warm-up steps run on a side stream, as capture does (lazy per-stream state is created off the default).
        Always the same one: memory a step frees is cached for reuse on the stream it was used on."""
        if self.warmup_stream is None:
            self.warmup_stream = torch.cuda.Stream(self.device)
        side = self.warmup_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(side)
