"""Server-sent events for one run: new metrics lines, new log lines and status changes, as they happen.

Each stream polls the run's files twice a second. That is simpler and more portable than file-change
notifications, and cheap: a poll is one ``stat`` per file plus reading only the new bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from slimtune.studio.context import Studio
from slimtune.studio.db import FINISHED_STATES
from slimtune.studio.services import runs as runs_svc
from slimtune.studio.services.tails import FileTail, parse_metric_lines, tail_lines

POLL_S = 0.5
HEARTBEAT_S = 15.0
INITIAL_LOG_LINES = 300


def sse(event: str, data: Any) -> str:
    """One SSE frame. JSON never contains a raw newline, so one ``data:`` line is enough."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def run_events(studio: Studio, run_id: str, *, poll_s: float = POLL_S) -> AsyncIterator[str]:
    """Yield SSE frames for a run until it has finished and everything it wrote has been sent.

    Frames: ``status`` (the run, whenever its status changes), ``metrics`` (a list of step records),
    ``events`` (records with an 'event' key), ``log`` (a list of lines), and a final ``end``.
    """
    row = runs_svc.get_run(studio, run_id)
    metrics = FileTail(runs_svc.run_dir(studio, run_id) / "metrics.jsonl")
    log_path = runs_svc.log_path(studio, run_id)
    yield "retry: 2000\n\n"
    yield sse("log", tail_lines(log_path, INITIAL_LOG_LINES))
    logs = FileTail(log_path, _size(log_path))
    last_status: str | None = None
    last_beat = time.monotonic()
    while not studio.shutting_down.is_set():
        row = studio.store.get("runs", run_id)
        if row is None:
            yield sse("end", {"reason": "deleted"})
            return
        sent = False
        new_metrics, new_events = parse_metric_lines(metrics.read_lines())
        if new_metrics:
            yield sse("metrics", new_metrics)
            sent = True
        if new_events:
            yield sse("events", new_events)
            sent = True
        new_logs = logs.read_lines()
        if new_logs:
            yield sse("log", new_logs)
            sent = True
        if row["status"] != last_status:
            last_status = row["status"]
            yield sse("status", runs_svc.run_info(studio, row))
            sent = True
        if row["status"] in FINISHED_STATES and not new_metrics and not new_logs:
            yield sse("end", {"reason": row["status"]})
            return
        now = time.monotonic()
        if sent:
            last_beat = now
        elif now - last_beat > HEARTBEAT_S:
            yield ": ping\n\n"  # keeps proxies and idle-timeouts from closing a quiet stream
            last_beat = now
        await asyncio.sleep(poll_s)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
