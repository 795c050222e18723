"""Fake stand-ins for the slimtune functions the Studio server calls in-process (tests only)."""

import json
from pathlib import Path

from slimtune.errors import DataError
from slimtune.studio import library

FAKE_FORMATS = [{"name": "lora", "description": "PEFT adapter folder"},
                {"name": "merged_16bit", "description": "Merged weights, bf16 safetensors"}]


def summarize_dataset(path, n_preview=5):
    rows, skipped = [], []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            skipped.append({"location": f"line {i}", "reason": "not valid JSON"})
            continue
        if not isinstance(obj, dict):
            skipped.append({"location": f"line {i}", "reason": "not an object"})
            continue
        rows.append(obj)
    if not rows:
        raise DataError(f"{Path(path).name}: no usable rows (expected JSON lines with messages or text).")
    cols = sorted({k for r in rows for k in r})
    return {"format": "chatml" if "messages" in cols else "text", "columns": cols, "n_rows": len(rows),
            "n_skipped": len(skipped), "skipped": skipped, "preview": rows[:n_preview]}


def memory_plan(cfg):
    """A made-up prediction with the real Plan type, so the panel and API work without torch; a budget is only
    compared, never planned for."""
    from slimtune.memory.planner import Plan
    from slimtune.memory.sizes import parse_memory_size

    gib = 2**30
    terms = {"weights": 0.5 if cfg.load_in_4bit else 2.0,
             "activations": cfg.max_seq_length * cfg.batch_size / 4096 / (2 if cfg.activation_offload else 1),
             "lora_and_optimizer": cfg.lora_r / 256 / (4 if cfg.optimizer == "adamw8bit" else 1)}
    budget = parse_memory_size(cfg.max_memory) if cfg.max_memory else None
    settings = {"load_in_4bit": cfg.load_in_4bit, "gradient_checkpointing": True, "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum, "optimizer": cfg.optimizer,
                "activation_offload": cfg.activation_offload, "mlp_chunk_size": cfg.mlp_chunk_size,
                "loss_chunk_size": cfg.loss_chunk_size}
    plan = Plan(model=cfg.model, seq_len=cfg.max_seq_length, settings=settings, breakdown=terms, phase="backward",
                predicted_bytes=sum(terms.values()) * gib, budget_bytes=budget)
    if plan.fits:
        return {"plan": plan, "message": None, "longest_seq_length": None}
    return {"plan": plan, "message": f"fake planner: nothing fits {cfg.max_memory}", "longest_seq_length": 0}


def install(monkeypatch) -> None:
    """Swap the library facade's functions for the fakes (pytest monkeypatch undoes it)."""
    monkeypatch.setattr(library, "summarize_dataset", summarize_dataset)
    monkeypatch.setattr(library, "memory_plan", memory_plan)
    monkeypatch.setattr(library, "export_formats", lambda: list(FAKE_FORMATS))
