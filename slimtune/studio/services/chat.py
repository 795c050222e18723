"""The server side of chat: one long-lived worker process that holds the models and streams tokens.

Requests and answers are JSON lines on the worker's stdin/stdout, each tagged with a request id. A single
reader thread routes every answer line to the asyncio queue of the request it belongs to, so a browser
that disconnects mid-stream (its request cancelled) never leaves stray lines for the next request. The
worker handles requests one at a time in arrival order; a cancel skips or cuts short a request.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from slimtune.studio.paths import new_id
from slimtune.studio.settings import PASSWORD_ENV

log = logging.getLogger("slimtune.studio.chat")
TERMINAL = ("done", "error")


class ChatManager:
    """Starts the chat worker on first use, feeds it requests and fans its answers out to streams."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self._command = command
        self._log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self.loaded: dict[str, Any] | None = None
        self._closed = False

    @property
    def busy(self) -> bool:
        """True while at least one request is being answered or waits for the worker."""
        with self._lock:
            return bool(self._subs)

    def _ensure_worker(self) -> subprocess.Popen:
        # Caller holds the lock.
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop(PASSWORD_ENV, None)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, start_new_session=True,
        )
        self._proc = proc
        self.loaded = None
        threading.Thread(target=self._read_stdout, args=(proc,), daemon=True, name="chat-out").start()
        threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True, name="chat-err").start()
        return proc

    def _send(self, proc: subprocess.Popen, message: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(message) + "\n").encode())
        proc.stdin.flush()

    def _deliver(self, rid: str | None, message: dict[str, Any]) -> None:
        with self._lock:
            targets = list(self._subs.items()) if rid is None else [(rid, self._subs.get(rid))]
        for _, sub in targets:
            if sub is not None:
                loop, queue = sub
                loop.call_soon_threadsafe(queue.put_nowait, message)

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            try:
                message = json.loads(raw)
            except ValueError:
                continue  # not protocol output; the worker routes prints to stderr, so this is rare
            if message.get("type") == "loaded":
                self.loaded = message.get("spec")
            self._deliver(message.get("id"), message)
        rc = proc.wait()
        with self._lock:
            if self._proc is proc:
                self._proc = None
                self.loaded = None
        if not self._closed:
            tail = "\n".join(self._stderr_tail)
            hint = " (it may have run out of memory)" if rc == -9 else ""
            self._deliver(None, {"type": "error", "text": f"The chat worker exited with code {rc}{hint}.\n{tail}"})

    def _read_stderr(self, pipe: IO[bytes]) -> None:
        with open(self._log_path, "ab", buffering=0) as logf:
            for raw in iter(pipe.readline, b""):
                logf.write(raw)
                text = raw.decode("utf-8", "replace").rstrip()
                if text:
                    self._stderr_tail.append(text)

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send one generation request and yield the worker's messages until 'done' or 'error'.

        If the consumer stops early (browser disconnected), the worker is told to cancel the request.
        """
        rid = new_id()
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        finished = False
        with self._lock:
            if self._closed:
                raise RuntimeError("the Studio is shutting down")
            proc = self._ensure_worker()
            self._subs[rid] = (loop, queue)
        try:
            await asyncio.to_thread(self._send, proc, {"op": "generate", "id": rid, **request})
            while True:
                message = await queue.get()
                if message.get("type") in TERMINAL:
                    finished = True
                yield message
                if finished:
                    return
        except (BrokenPipeError, OSError) as exc:
            finished = True
            yield {"type": "error", "text": f"The chat worker is not reachable: {exc}"}
        finally:
            with self._lock:
                self._subs.pop(rid, None)
                proc_now = self._proc
            if not finished and proc_now is not None:
                try:
                    self._send(proc_now, {"op": "cancel", "id": rid})
                except OSError:
                    pass

    def unload(self) -> None:
        """End the worker so the memory its models hold is freed; the next chat starts a new one."""
        with self._lock:
            proc, self._proc, self.loaded = self._proc, None, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def shutdown(self) -> None:
        """Stop the worker for good (server shutdown)."""
        self._closed = True
        self.unload()
