"""Run metrics: metrics.jsonl (one JSON object per optimizer step) and optional TensorBoard event files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from slimtune.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

# Keys of a step record that TensorBoard gets as scalars (the rest is bookkeeping: step, epoch, tokens, …).
_TB_SCALARS = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "mem_gib")


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl, flushed at once so live viewers see each step.

    Args:
        path: the metrics.jsonl file.
        append: keep existing lines (a resumed run, after `truncate_metrics`); False starts the file anew so
            every step appears exactly once.
    """

    def __init__(self, path: Path, *, append: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a" if append else "w", buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    """Parsed records of a metrics.jsonl; a torn last line (process killed mid-write) is dropped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep only the records of steps <= `step` (a resume replays the later ones); returns the kept records."""
    path = Path(path)
    if not path.is_file():
        return []
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


class TensorBoardLogger:
    """Scalars of each step record into RUN_DIR/tb/ when tensorboard is installed; a no-op otherwise."""

    def __init__(self, run_dir: Path, *, purge_step: int | None = None, log=print) -> None:
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
        except ImportError:
            # Optional extra: metrics.jsonl holds everything; say once why there is no tb/ folder.
            log("info: tensorboard is not installed, so no TensorBoard logs (pip install tensorboard); "
                "metrics.jsonl has every step")
            return
        # purge_step makes TensorBoard drop events a killed run wrote after the checkpoint we resume from.
        self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def write(self, record: dict) -> None:
        if self._writer is None:
            return
        for key in _TB_SCALARS:
            if isinstance(record.get(key), (int, float)):
                self._writer.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", record[key],
                                        record["step"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
