"""`slimtune bench`: LoRA training steps on random weights of a real geometry, measured like the anchors.

Method (identical to ../shared/bench/anchors): batch 1, LoRA r=16 alpha 16 on q/k/v/o/gate/up/down, AdamW lr 1e-4,
6 steps, median step time of the last 4, peak = torch.cuda.max_memory_allocated() after
reset_peak_memory_stats() just before the first step. Weights are excluded from nothing: the peak includes them.
With --multimodal the seq tokens include one image and one audio clip (slimtune.bench.mm_batch), so the towers
run every step (and train, with the tower LoRA options).
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from slimtune.adapt.inject import add_lora, trainable_parameters
from slimtune.bench.mm_batch import multimodal_batch
from slimtune.bench.random_model import build_random_model
from slimtune.data.multimodal import AUDIO_TYPE_ID, IMAGE_TYPE_ID
from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.train.run import enable_checkpointing
from slimtune.train.step import accumulate_gradients, clip_and_step


@dataclass
class BenchOptions:
    """Which memory/speed techniques a benchmark run uses (each switchable for ablations)."""

    offload_ple: bool = True
    gradient_checkpointing: bool = True
    attention: str = "sdpa"
    fused_adamw: bool = True
    compile_layers: bool = False
    finetune_vision_layers: bool = False
    finetune_audio_layers: bool = False
    extra: dict = field(default_factory=dict)


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
              options: BenchOptions | None = None, device="cuda") -> dict:
    """Build, adapt and train `steps` steps; returns peak memory and speed figures (one JSON-able dict)."""
    options = options or BenchOptions()
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
             finetune_vision_layers=options.finetune_vision_layers, finetune_audio_layers=options.finetune_audio_layers)
    if options.compile_layers:
        from slimtune.adapt.compile import compile_decoder_layers  # noqa: PLC0415

        compile_decoder_layers(model)
    if options.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=options.fused_adamw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    cpu_batch = bench_batch(model, seq, multimodal=multimodal, gen=gen)
    torch.cuda.synchronize()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss, _ = accumulate_gradients(model, [cpu_batch], device=device, dtype=torch.bfloat16)
        clip_and_step(params, opt, sched, max_grad_norm=0.0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss)
    step_s = statistics.median(times[2:]) if len(times) > 2 else times[-1]
    result = dict(probe="slimtune", variant=variant, mode=mode, seq=seq, multimodal=multimodal,
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                  reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                  weights_gib=round(weights_gib, 3), step_s=round(step_s, 4), tok_s=round(seq / step_s, 1),
                  build_s=round(build_s, 1), loss_first=round(losses[0], 3), loss_last=round(losses[-1], 3),
                  lora_params=sum(p.numel() for p in params), options=asdict(options))
    if multimodal:
        types = cpu_batch["mm_token_type_ids"]
        result.update(image_tokens=int((types == IMAGE_TYPE_ID).sum()),
                      audio_tokens=int((types == AUDIO_TYPE_ID).sum()))
    del model, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return result


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
              options: BenchOptions | None = None, json_path=None, log=print) -> list[dict]:
    """Run every (mode, seq) combination; each result is printed as one JSON line and appended to json_path."""
    results = [dict(probe="env", **environment())]
    log(json.dumps(results[0]))
    for mode in modes:
        for seq in seqs:
            try:
                r = bench_one(variant, mode, seq, steps=steps, multimodal=multimodal, options=options)
            except torch.OutOfMemoryError as exc:
                r = dict(probe="slimtune", variant=variant, mode=mode, seq=seq, error=f"out of memory: {exc}"[:300])
                gc.collect()
                torch.cuda.empty_cache()
            results.append(r)
            log(json.dumps(r))
            if json_path:
                with open(json_path, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return results
