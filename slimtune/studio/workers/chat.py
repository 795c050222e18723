"""Chat worker: holds a base model (and its adapter) and streams generated text as JSON lines.

Run as ``python -m slimtune.studio.workers.chat``; the Studio server starts it on the first chat message.
Protocol (one JSON object per line):

- in:  ``{"op": "generate", "id", "load": {"model", "adapter", "load_in_4bit"}, "side", "messages", "params"}``,
  ``{"op": "cancel", "id"}``
- out: ``{"id", "type": "status"|"loaded"|"token"|"done"|"error", ...}``

The base model is loaded once. The adapter side wraps it with ``slimtune.load_adapter``; the base side then
runs with the adapter switched off (``disable_adapter()``) when the adapted model offers that, and otherwise
on a separately loaded clean copy, because loading an adapter changes the base model's modules in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
import traceback
from typing import IO, Any


class ModelHolder:
    """The models currently in memory and the settings they were loaded with."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Drop every model held (before loading a different base or adapter)."""
        self.key: tuple[str, bool] | None = None
        self.model: Any = None
        self.tok: Any = None
        self.adapter: str | None = None
        self.clean_base: Any = None

    def _load(self, ref: str, load_in_4bit: bool) -> tuple[Any, Any]:
        import slimtune

        return slimtune.load_model(ref, dtype=None, load_in_4bit=load_in_4bit)

    def get(self, spec: dict[str, Any], side: str, status) -> tuple[Any, Any, contextlib.AbstractContextManager]:
        """Model, tokenizer and a context to generate in for one side, loading what is missing."""
        import slimtune

        key = (str(spec["model"]), bool(spec.get("load_in_4bit", False)))
        adapter = spec.get("adapter")
        if self.key != key or (side == "adapter" and self.adapter not in (None, adapter)):
            # A different base, or a different adapter already injected: start from a fresh base.
            self.reset()
            status(f"Loading {key[0]}…")
            self.model, self.tok = self._load(*key)
            self.key = key
        if side == "adapter":
            if self.adapter is None:
                status("Loading the adapter…")
                self.model = slimtune.load_adapter(self.model, adapter)
                self.adapter = adapter
            return self.model, self.tok, contextlib.nullcontext()
        if self.adapter is None:
            return self.model, self.tok, contextlib.nullcontext()
        if hasattr(self.model, "disable_adapter"):
            return self.model, self.tok, self.model.disable_adapter()
        if self.clean_base is None:
            status("Loading a clean copy of the base model…")
            self.clean_base, _ = self._load(*key)
        return self.clean_base, self.tok, contextlib.nullcontext()


class Worker:
    """Reads requests on a thread (so cancels arrive mid-generation) and answers them in order."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.requests: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()
        self.holder = ModelHolder()

    def emit(self, rid: str | None, kind: str, **fields: Any) -> None:
        with self.lock:
            self.out.write(json.dumps({"id": rid, "type": kind, **fields}) + "\n")
            self.out.flush()

    def read_requests(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("op") == "cancel":
                self.cancelled.add(str(msg.get("id")))
            else:
                self.requests.put(msg)
        self.requests.put(None)  # stdin closed: the server went away

    def handle(self, msg: dict[str, Any]) -> None:
        rid = str(msg.get("id"))
        if rid in self.cancelled:
            self.emit(rid, "done", cancelled=True)
            return
        from slimtune.infer.generate import generate

        spec, side, params = msg["load"], msg["side"], msg.get("params", {})
        model, tok, ctx = self.holder.get(spec, side, lambda text: self.emit(rid, "status", text=text))
        self.emit(rid, "loaded", spec={**spec, "side": side})
        n, t0 = 0, time.perf_counter()
        with ctx:
            pieces = generate(model, tok, msg["messages"], stream=True, **params)
            try:
                for piece in pieces:
                    if rid in self.cancelled:
                        break
                    n += 1
                    self.emit(rid, "token", text=piece)
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
        dt = time.perf_counter() - t0
        self.emit(rid, "done", cancelled=rid in self.cancelled, pieces=n, seconds=round(dt, 3))

    def serve(self) -> None:
        while True:
            msg = self.requests.get()
            if msg is None:
                return
            if msg.get("op") != "generate":
                continue
            try:
                self.handle(msg)
            except Exception as exc:  # noqa: BLE001 - report any failure to the browser, keep serving
                traceback.print_exc()
                self.emit(str(msg.get("id")), "error", text=f"{type(exc).__name__}: {exc}")
            finally:
                self.cancelled.discard(str(msg.get("id")))


def main() -> None:
    # Keep the protocol on a private copy of stdout; anything the libraries print goes to stderr (the log).
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker(proto)
    threading.Thread(target=worker.read_requests, args=(sys.stdin,), daemon=True).start()
    worker.serve()


if __name__ == "__main__":
    main()
