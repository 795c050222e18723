"""`slimtune bench`: LoRA training steps on random weights of a real geometry, measured like the anchors.

Method (identical to ../shared/bench/anchors): batch 1, LoRA r=16 alpha 16 on q/k/v/o/gate/up/down, AdamW lr 1e-4,
6 steps, median step time of the last 4, peak = torch.cuda.max_memory_allocated() after
reset_peak_memory_stats() just before the first step. Weights are excluded from nothing: the peak includes them.
With --multimodal the seq tokens include one image and one audio clip (slimtune.bench.mm_batch), so the towers
run every step (and train, with the tower LoRA options).
"""

from __future__ import annotations

import functools
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from slimtune.adapt.experts_grouped import IMPLS, experts_impl
from slimtune.adapt.inject import add_lora, trainable_parameters
from slimtune.bench.mm_batch import multimodal_batch
from slimtune.bench.random_model import build_random_model
from slimtune.data.multimodal import AUDIO_TYPE_ID, IMAGE_TYPE_ID
from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.errors import ConfigError
from slimtune.train.optimizer import OPTIMIZERS, make_optimizer
from slimtune.train.run import apply_layer_switches
from slimtune.train.step import accumulate_gradients, clip_and_step


@dataclass
class BenchOptions:
    """Which memory/speed techniques a benchmark run uses (each switchable for ablations)."""

    offload_ple: bool = True
    gradient_checkpointing: bool = True
    checkpoint_layers: int | None = None
    """With gradient_checkpointing: the first N decoder layers recompute (None = all)."""
    attention: str = "sdpa"
    fused_adamw: bool = True
    compile_layers: bool = False
    activation_offload: bool = False
    """Checkpointed decoder-layer inputs in pinned host memory (needs gradient_checkpointing)."""
    mlp_chunk_size: int = 0
    """Sequence-tiled MLP: tokens per chunk (0 = off)."""
    optimizer: str = "adamw"
    """adamw | adamw8bit."""
    loss_chunk_size: int = 0
    finetune_vision_layers: bool = False
    finetune_audio_layers: bool = False
    recompute_norms: bool = True
    """RMSNorms save their 16-bit input (slimtune.adapt.rms_norm); the training default too."""
    finetune_experts: bool = False
    """MoE geometries (26b-a4b): LoRA on the fused expert tensors too."""
    cuda_graphs: bool = False
    """Capture the whole step as a CUDA graph after warm-up (slimtune.train.cuda_graph; with adamw8bit the forward
    and backward, the update running eagerly after them)."""
    experts_impl: str = "auto"
    """MoE experts we run (NF4 experts, expert LoRA): auto | loop | grouped (slimtune.adapt.experts_grouped)."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = []
        if not isinstance(self.mlp_chunk_size, int) or isinstance(self.mlp_chunk_size, bool) \
                or self.mlp_chunk_size < 0:
            p.append(f"mlp_chunk_size must be an integer >= 0 (got {self.mlp_chunk_size!r})")
        if self.optimizer not in OPTIMIZERS:
            p.append(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.cuda_graphs and (self.activation_offload or (self.optimizer == "adamw" and not self.fused_adamw)):
            p.append("cuda_graphs needs no activation_offload (and, with optimizer adamw, the fused AdamW)")
        if self.experts_impl not in IMPLS:
            p.append(f"experts_impl must be one of {', '.join(IMPLS)} (got {self.experts_impl!r})")
        if self.activation_offload and not self.gradient_checkpointing:
            p.append("activation_offload needs gradient_checkpointing (it offloads the checkpointed layer inputs)")
        if p:
            raise ConfigError("invalid bench options:\n  - " + "\n  - ".join(p))


def _batch(seq: int, vocab: int, gen) -> dict:
    ids = torch.randint(3, vocab, (1, seq), generator=gen)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE_INDEX)], dim=1)
    return {"input_ids": ids, "targets": targets}


def bench_batch(model, seq: int, *, multimodal: bool, gen: torch.Generator) -> dict:
    """The CPU batch of one benchmark step: random text, or one image + one audio clip + text (same seq)."""
    if multimodal:
        return multimodal_batch(model, seq, generator=gen)
    return _batch(seq, model.config.get_text_config().vocab_size, gen)


def bench_one(variant: str, mode: str, seq: int, *, steps: int = 6, multimodal: bool = False,
              options: BenchOptions | None = None, device="cuda", profile_steps: int = 0) -> dict:
    """Build, adapt and train `steps` steps; returns peak memory and speed figures (one JSON-able dict).

    profile_steps > 0 adds that many untimed steps under torch.profiler (result["profile"], slimtune.bench.profile).
    """
    options = options or BenchOptions()
    with experts_impl(options.experts_impl):  # the switch is process-wide: restored for the next combination
        return _bench_one(variant, mode, seq, steps=steps, multimodal=multimodal, options=options, device=device,
                          profile_steps=profile_steps)


def _bench_one(variant: str, mode: str, seq: int, *, steps: int, multimodal: bool, options: BenchOptions,
               device, profile_steps: int) -> dict:
    device = torch.device(device)
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    model = build_random_model(variant, mode=mode, multimodal=multimodal, device=device,
                               offload_ple=options.offload_ple)
    build_s = time.perf_counter() - t0
    if options.attention != "sdpa":
        from slimtune.adapt.attention import enable_slimtune_attention  # noqa: PLC0415

        enable_slimtune_attention(model)
    add_lora(model, r=16, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"],
             finetune_vision_layers=options.finetune_vision_layers, finetune_audio_layers=options.finetune_audio_layers,
             finetune_experts=options.finetune_experts)
    offloader = apply_layer_switches(model, mlp_chunk_size=options.mlp_chunk_size,
                                     recompute_norms=options.recompute_norms, compile_layers=options.compile_layers,
                                     loss_chunk_size=options.loss_chunk_size,
                                     gradient_checkpointing=options.gradient_checkpointing,
                                     activation_offload=options.activation_offload,
                                     checkpoint_layers=options.checkpoint_layers)
    model.train()
    params = trainable_parameters(model)
    opt = make_optimizer(params, name=options.optimizer, lr=1e-4, fused=options.fused_adamw,
                         capturable=options.cuda_graphs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    cpu_batch = bench_batch(model, seq, multimodal=multimodal, gen=gen)
    graphed = None
    if options.cuda_graphs:  # 2 eager warm-up steps, the capture at step 3, replays after
        from slimtune.train.cuda_graph import GraphedTrainStep  # noqa: PLC0415

        graphed = GraphedTrainStep(model, params, opt, cpu_batch, device=device, dtype=torch.bfloat16, warmup=2)
    torch.cuda.synchronize()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []

    def one_step() -> float:
        if graphed is not None:
            loss_t, _, _ = graphed(cpu_batch)
            sched.step()
            return float(loss_t)
        loss, _ = accumulate_gradients(model, [cpu_batch], device=device, dtype=torch.bfloat16)
        clip_and_step(params, opt, sched, max_grad_norm=0.0)
        return loss

    for _ in range(steps):
        t = time.perf_counter()
        loss = one_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss)
    skip = 3 if graphed is not None else 2  # warm-up (and capture) steps are not timed
    step_s = statistics.median(times[skip:]) if len(times) > skip else times[-1]
    result = dict(probe="slimtune", variant=variant, mode=mode, seq=seq, multimodal=multimodal,
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                  reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                  weights_gib=round(weights_gib, 3), step_s=round(step_s, 4), tok_s=round(seq / step_s, 1),
                  build_s=round(build_s, 1), loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3),
                  lora_params=sum(p.numel() for p in params), options=asdict(options),
                  predicted_gib=predicted_gib(variant, mode, seq, options, multimodal))
    if profile_steps > 0:  # after the peak and the timing were read: profiling changes neither
        from slimtune.bench.profile import profile_steps as run_profile  # noqa: PLC0415

        result["profile"] = run_profile(one_step, profile_steps)
    if graphed is not None:
        graphed.close()
        result["step_times_s"] = [round(x, 4) for x in times]
    if offloader is not None:  # per step: the counters ran over all `steps`
        result["offloaded_gib_per_step"] = round(offloader.offloaded_bytes / steps / 2**30, 3)
    if multimodal:
        types = cpu_batch["mm_token_type_ids"]
        result.update(image_tokens=int((types == IMAGE_TYPE_ID).sum()),
                      audio_tokens=int((types == AUDIO_TYPE_ID).sum()))
    del model, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _planner_settings(mode: str, options: BenchOptions) -> dict:
    """The planner's view of a benchmark configuration (batch 1, r=16, the bench's AdamW)."""
    return dict(load_in_4bit=mode == "qlora", offload_ple=options.offload_ple, attention=options.attention,
                gradient_checkpointing=options.gradient_checkpointing, loss_chunk_size=options.loss_chunk_size,
                batch_size=1, grad_accum=1, lora_r=16, optimizer=options.optimizer,
                activation_offload=options.activation_offload, mlp_chunk_size=options.mlp_chunk_size,
                cuda_graphs=options.cuda_graphs, finetune_experts=options.finetune_experts,
                recompute_norms=options.recompute_norms, compile_layers=options.compile_layers,
                checkpoint_layers=options.checkpoint_layers)


def predicted_gib(variant: str, mode: str, seq: int, options: BenchOptions, multimodal: bool = False) -> float | None:
    """The memory estimate for this benchmark configuration, recorded beside the measured peak (None on failure)."""
    from slimtune.memory.planner import predict  # noqa: PLC0415

    try:
        plan = predict(variant, seq, multimodal=multimodal, **_planner_settings(mode, options))
    except Exception:  # a prediction problem must not lose a GPU measurement
        return None
    return round(plan.predicted_gib, 3)


_PLANNED = ("gradient_checkpointing", "loss_chunk_size", "activation_offload", "mlp_chunk_size", "optimizer")


def planned_options(variant: str, mode: str, seq: int, options: BenchOptions, budget_bytes: int,
                    explicit: frozenset = frozenset(), multimodal: bool = False) -> tuple[BenchOptions, str]:
    """Options the planner picks for `budget_bytes` among what the bench can switch (the memory techniques).

    Everything else (mode, PLE offload, attention, batch 1, AdamW) stays as given; `explicit` names the options the
    user set on the command line, which stay too. Raises MemoryBudgetError when nothing fits.
    """
    from slimtune.memory.planner import plan_memory  # noqa: PLC0415

    if options.cuda_graphs:  # a captured step cannot offload activations (8-bit AdamW steps eagerly after it)
        explicit = explicit | {"activation_offload"}
    fixed = {k: v for k, v in _planner_settings(mode, options).items() if k not in _PLANNED or k in explicit}
    plan = plan_memory(variant, seq, budget_bytes, multimodal=multimodal, **fixed)
    new = replace(options, **{k: plan.settings[k] for k in _PLANNED})
    return new, plan.summary()


def environment() -> dict:
    """Card and versions, recorded with every result file."""
    import transformers  # noqa: PLC0415

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import bitsandbytes  # noqa: PLC0415

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return info


def run_bench(variant: str, modes: list[str], seqs: list[int], *, steps: int = 6, multimodal: bool = False,
              options: BenchOptions | None = None, json_path=None, log=print, max_memory: int | None = None,
              explicit: frozenset = frozenset(), profile_steps: int = 0) -> list[dict]:
    """Run every (mode, seq) combination; each result is printed as one JSON line and appended to json_path.

    With max_memory (bytes), each combination runs with the options the planner picks for that budget.
    """
    from slimtune.memory.planner import MemoryBudgetError  # noqa: PLC0415

    options = options or BenchOptions()
    results = [dict(probe="env", **environment())]
    log(json.dumps(results[0]))
    for mode in modes:
        for seq in seqs:
            try:
                opts = options
                if max_memory is not None:
                    opts, summary = planned_options(variant, mode, seq, options, max_memory, explicit, multimodal)
                    log(summary)
                r = bench_one(variant, mode, seq, steps=steps, multimodal=multimodal, options=opts,
                              profile_steps=profile_steps)
            except MemoryBudgetError as exc:
                r = dict(probe="slimtune", variant=variant, mode=mode, seq=seq, error=f"no plan fits: {exc}"[:400])
            except torch.OutOfMemoryError as exc:
                r = dict(probe="slimtune", variant=variant, mode=mode, seq=seq, error=f"out of memory: {exc}"[:300])
                gc.collect()
                torch.cuda.empty_cache()
            results.append(r)
            emit_record(r, json_path, log)
            if "profile" in r:
                from slimtune.bench.profile import format_profile  # noqa: PLC0415

                log(format_profile(r["profile"]))
    return results


def emit_record(record: dict, json_path: str | None = None, log=None) -> None:
    """One benchmark record: a JSON line to `log` (default: stdout, flushed, so a device call that runs out of
    time still returns it), and appended to `json_path` when given (the GPU scripts too)."""
    line = json.dumps(record)
    (log or functools.partial(print, flush=True))(line)
    if json_path:
        with open(json_path, "a") as f:
            f.write(line + "\n")
