"""Worker processes for GPU jobs (training and export): one at a time, the rest wait in a FIFO queue.

Each job is a subprocess in its own process group, so stopping it (SIGTERM, then SIGKILL after a grace
period) also ends anything it spawned (data loader workers, compilers). A reader thread per pipe copies
stdout and stderr into the job's log file; a watcher thread waits for the exit and records the outcome.
A crash, an OOM kill or a non-zero exit only marks that job failed: the server keeps serving.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from slimtune.studio.db import COMPLETED, FAILED, INTERRUPTED, QUEUED, RUNNING, STOPPED, Store
from slimtune.studio.settings import PASSWORD_ENV

log = logging.getLogger("slimtune.studio.jobs")
STDERR_TAIL_LINES = 15


@dataclass
class JobResult:
    """How a job ended: a final status, the exit code (negative = killed by that signal) and an error."""

    status: str
    exit_code: int | None = None
    error: str | None = None


@dataclass
class Job:
    """One queued unit of work: a row in ``table`` and the command that does it."""

    table: str
    """Database table of the job's row: 'runs' or 'exports'."""
    id: str
    argv: list[str]
    log_path: Path
    finalize: Callable[[JobResult], JobResult] | None = None
    """Called in the watcher thread after the process ends (e.g. to zip an export); may change the result."""


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    stop_requested: bool = False
    shutting_down: bool = False
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES))


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # so log lines reach the browser as they are printed
    env.pop(PASSWORD_ENV, None)  # workers have no use for the Studio password
    return env


class JobManager:
    """Runs at most one job at a time; the rest wait in submission order."""

    def __init__(self, store: Store, *, stop_grace_s: float = 10.0) -> None:
        self._store = store
        self._grace = stop_grace_s
        self._queue: collections.deque[Job] = collections.deque()
        self._current: _Running | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._idle = threading.Condition(self._lock)

    # ----- public API -------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job; it starts at once when nothing else runs."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the Studio is shutting down")
            self._store.update(job.table, job.id, status=QUEUED, error=None, exit_code=None,
                               started_at=None, finished_at=None)
            self._queue.append(job)
            self._pump()

    def stop(self, table: str, job_id: str) -> bool:
        """Stop a queued or running job. Returns False if it was neither."""
        with self._lock:
            for queued in list(self._queue):
                if (queued.table, queued.id) == (table, job_id):
                    self._queue.remove(queued)
                    self._store.update(table, job_id, status=STOPPED, finished_at=time.time())
                    return True
            cur = self._current
            if cur is None or (cur.job.table, cur.job.id) != (table, job_id):
                return False
            cur.stop_requested = True
        self._terminate(cur)
        return True

    def queue_position(self, table: str, job_id: str) -> int | None:
        """1-based place in the queue, or None if the job is not waiting."""
        with self._lock:
            for i, job in enumerate(self._queue):
                if (job.table, job.id) == (table, job_id):
                    return i + 1
        return None

    def running(self) -> tuple[str, str] | None:
        """``(table, id)`` of the job running now."""
        with self._lock:
            return (self._current.job.table, self._current.job.id) if self._current else None

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing runs or waits (tests use this). Returns False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._current is not None or self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self) -> None:
        """Stop the running job (it will show as interrupted) and leave queued jobs queued for next time."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            cur = self._current
            if cur is not None:
                cur.shutting_down = True
        if cur is not None:
            self._terminate(cur, grace=min(self._grace, 3.0))
            cur.proc.wait()
            for _ in range(50):  # let the watcher record 'interrupted' before the database closes
                if self.running() is None:
                    break
                time.sleep(0.02)

    # ----- internals --------------------------------------------------------------------------------
    def _pump(self) -> None:
        # Caller holds the lock.
        while self._current is None and self._queue and not self._closed:
            job = self._queue.popleft()
            try:
                self._current = self._spawn(job)
            except Exception as exc:  # noqa: BLE001 - any failure to launch fails this job only
                log.warning("could not start %s %s: %s", job.table, job.id, exc)
                self._store.update(job.table, job.id, status=FAILED, finished_at=time.time(),
                                   error=f"Could not start the worker: {exc}")
        if self._current is None and not self._queue:
            self._idle.notify_all()

    def _spawn(self, job: Job) -> _Running:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(job.log_path, "ab", buffering=0)  # noqa: SIM115 - closed by the watcher thread
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        logf.write(f"=== {stamp} starting: {' '.join(job.argv)}\n".encode())
        proc = subprocess.Popen(
            job.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_worker_env(), start_new_session=True,  # own process group: stop kills its children too
        )
        running = _Running(job=job, proc=proc)
        self._store.update(job.table, job.id, status=RUNNING, started_at=time.time())
        write_lock = threading.Lock()
        readers = [
            threading.Thread(target=self._copy, args=(proc.stdout, logf, write_lock, None), daemon=True),
            threading.Thread(target=self._copy, args=(proc.stderr, logf, write_lock, running.stderr_tail),
                             daemon=True),
        ]
        for t in readers:
            t.start()
        threading.Thread(target=self._watch, args=(running, readers, logf), daemon=True,
                         name=f"job-{job.id}").start()
        return running

    @staticmethod
    def _copy(pipe: IO[bytes], logf: IO[bytes], write_lock: threading.Lock, tail: collections.deque | None) -> None:
        for raw in iter(pipe.readline, b""):
            # Progress bars redraw in place with '\r': keep only what the terminal would finally show.
            segments = [seg for seg in raw.rstrip(b"\n").split(b"\r") if seg.strip()]
            if not segments:
                continue
            line = segments[-1] + b"\n"
            with write_lock:
                logf.write(line)
            if tail is not None:
                for piece in line.decode("utf-8", "replace").splitlines():
                    if piece.strip():
                        tail.append(piece)
        pipe.close()

    def _watch(self, running: _Running, readers: list[threading.Thread], logf: IO[bytes]) -> None:
        rc = running.proc.wait()
        for t in readers:
            t.join(timeout=5)
        result = self._outcome(running, rc)
        if running.job.finalize is not None and result.status == COMPLETED:
            try:
                result = running.job.finalize(result)
            except Exception as exc:  # noqa: BLE001 - a failed post-step fails the job, not the server
                result = JobResult(FAILED, rc, f"Finished, but post-processing failed: {exc}")
        logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {result.status} (exit code {rc})\n".encode())
        logf.close()
        with self._lock:
            try:
                self._store.update(running.job.table, running.job.id, status=result.status, exit_code=rc,
                                   error=result.error, finished_at=time.time())
            except sqlite3.ProgrammingError:
                # The database closed during shutdown; the next start marks this job interrupted.
                log.warning("could not record the end of %s %s (database closed)", running.job.table, running.job.id)
            self._current = None
            self._pump()

    @staticmethod
    def _outcome(running: _Running, rc: int) -> JobResult:
        if running.shutting_down:
            return JobResult(INTERRUPTED, rc, "The Studio server stopped while this job was running.")
        if running.stop_requested:
            return JobResult(STOPPED, rc, None)
        if rc == 0:
            return JobResult(COMPLETED, rc, None)
        tail = "\n".join(running.stderr_tail)
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            hint = " (the system may have run out of memory)" if -rc == signal.SIGKILL else ""
            head = f"The worker was killed by {name}{hint}."
        else:
            head = f"The worker exited with code {rc}."
        return JobResult(FAILED, rc, f"{head}\n{tail}".strip())

    def _terminate(self, running: _Running, grace: float | None = None) -> None:
        """SIGTERM the job's process group, then SIGKILL it if it is still alive after the grace period."""
        grace = self._grace if grace is None else grace
        try:
            os.killpg(running.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def escalate() -> None:
            try:
                running.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(running.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        threading.Thread(target=escalate, daemon=True).start()
