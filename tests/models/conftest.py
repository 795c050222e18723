"""Fixtures of the loader tests: what a load reads from the checkpoint's safetensors files."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import safetensors


class TrackingFile:
    """A safe_open handle that records every tensor it hands out (whole or a row slice) and whether it is still alive."""

    def __init__(self, handle, log):
        self._h, self._log = handle, log

    def __enter__(self):
        self._h.__enter__()
        return self

    def __exit__(self, *exc):
        return self._h.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._h, name)

    def _track(self, key, tensor):
        log = self._log
        log["alive_before_read"].append(sum(log["alive"].values()))
        log["reads"].append(key)
        token = object()
        log["alive"][id(token)] = tensor.nbytes
        weakref.finalize(tensor, log["alive"].pop, id(token), None)
        log["peak"] = max(log["peak"], sum(log["alive"].values()))
        return tensor

    def get_tensor(self, key):
        return self._track(key, self._h.get_tensor(key))

    def get_slice(self, key):
        outer, inner = self, self._h.get_slice(key)

        class _Slice:
            def get_shape(self):
                return inner.get_shape()

            def __getitem__(self, rows):
                outer._log["slices"].append((key, rows.start, rows.stop))
                return outer._track(key, inner[rows])

        return _Slice()


@pytest.fixture
def checkpoint_reads(monkeypatch):
    """``with checkpoint_reads() as log: load_model(...)``: every tensor safetensors hands out inside the block.

    log["reads"]: keys in read order; log["slices"]: (key, start, stop) of row-slice reads; log["alive_before_read"]:
    bytes of earlier reads still alive at each read; log["peak"]: the most bytes alive at once.
    """

    @contextlib.contextmanager
    def track():
        log = {"alive": {}, "alive_before_read": [], "reads": [], "slices": [], "peak": 0}
        real_open = safetensors.safe_open
        with monkeypatch.context() as m:
            m.setattr(safetensors, "safe_open", lambda *a, **k: TrackingFile(real_open(*a, **k), log))
            yield log

    return track
