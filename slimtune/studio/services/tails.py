"""Reading a run's ``metrics.jsonl`` and log file, in full or incrementally (for live streams)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_READ = 4 * 1024 * 1024  # per call, so one huge file cannot stall the server


@dataclass
class FileTail:
    """Follows a growing text file, returning only complete new lines (a half-written line waits)."""

    path: Path
    offset: int = 0

    def read_lines(self) -> list[str]:
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return []
        if size < self.offset:  # the file was replaced (e.g. a fresh run in the same folder)
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(min(size - self.offset, MAX_READ))
        end = data.rfind(b"\n")
        if end < 0:
            # No complete line yet; an over-long line without a newline is returned whole.
            if len(data) < MAX_READ:
                return []
            end = len(data) - 1
        self.offset += end + 1
        return data[: end + 1].decode("utf-8", "replace").splitlines()


def parse_metric_lines(lines: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split metrics.jsonl lines into per-step records and event records; skip lines that are not JSON.

    Unknown keys are kept as they are; the browser picks the series it knows.
    """
    metrics: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        if "event" in obj:
            events.append(obj)
        elif "step" in obj:
            metrics.append(obj)
    return metrics, events


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Records after byte ``offset`` and the offset to continue from."""
    tail = FileTail(path, offset)
    metrics: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    while True:
        lines = tail.read_lines()
        if not lines:
            break
        m, e = parse_metric_lines(lines)
        metrics += m
        events += e
    return metrics, events, tail.offset


def last_metric(path: Path) -> dict[str, Any] | None:
    """The newest per-step record, read from the end of the file (cheap for the runs table)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return None
    metrics, _ = parse_metric_lines(data.decode("utf-8", "replace").splitlines())
    return metrics[-1] if metrics else None


def tail_lines(path: Path, n: int) -> list[str]:
    """The last ``n`` lines of a log file (reads at most the last 1 MiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 1024 * 1024))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if size > 1024 * 1024 and lines:
        lines = lines[1:]  # the first line is probably cut
    return lines[-n:] if n > 0 else []
