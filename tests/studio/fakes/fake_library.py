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


def estimate_training_memory(model, *, seq_len, batch_size, load_in_4bit, lora_r):
    weights = 0.5 if load_in_4bit else 2.0
    acts = seq_len * batch_size / 4096
    lora = lora_r / 256
    return {"total_gib": weights + acts + lora,
            "breakdown": {"weights": weights, "activations": acts, "lora+optimizer": lora}}


def install(monkeypatch) -> None:
    """Swap the library facade's functions for the fakes (pytest monkeypatch undoes it)."""
    monkeypatch.setattr(library, "summarize_dataset", summarize_dataset)
    monkeypatch.setattr(library, "estimate_training_memory", estimate_training_memory)
    monkeypatch.setattr(library, "export_formats", lambda: list(FAKE_FORMATS))
