"""All-or-nothing output folders: build an export in a temp folder beside its target, then rename.

A half-written export is worse than none: a reader (transformers, llama.cpp, a user's script) may pick it up and
fail much later, or silently load a truncated shard. Every exporter therefore writes into a temp folder in the
*same parent folder* as the target (so the final `rename` stays on one filesystem and is atomic) and only renames
it into place once everything has been written. On any failure, including a full disk, the temp folder is deleted
and the target is left exactly as it was.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimtune.errors import ExportError
from slimtune.utils.atomic import atomic_dir


__all__ = ["atomic_output_dir", "check_output_free", "dir_size_bytes"]


def check_output_free(out: Path, *, overwrite: bool) -> None:
    """Fail early, before any work, if `out` exists and may not be replaced.

    Args:
        out: the folder the export will create.
        overwrite: whether an existing `out` may be replaced.

    Raises:
        ExportError: `out` exists and `overwrite` is False, or `out` is a file.
    """
    if out.exists() and not overwrite:
        raise ExportError(
            f"output path {str(out)!r} already exists; pass overwrite=True (CLI: --overwrite) to replace it, "
            "or choose another output folder"
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {str(out)!r} is a file; exports are written to a folder, pick another path")


def dir_size_bytes(path: Path) -> int:
    """Total size of the regular files under `path` (0 if it does not exist)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def atomic_output_dir(out: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; rename it to `out` if the block succeeds.

    Usage::

        with atomic_output_dir(Path("exports/merged"), overwrite=False) as tmp:
            write_everything_into(tmp)
        # exports/merged now exists and is complete

    On success an existing `out` (allowed by `overwrite`) is swapped out first and deleted only after the new
    folder is in place, so a crash between the two renames still leaves one complete folder. On failure the temp
    folder is deleted and `out` is untouched.

    Args:
        out: the folder to create.
        overwrite: replace `out` if it already exists.

    Yields:
        The temp folder to write into (same parent folder as `out`).

    Raises:
        ExportError: `out` exists without `overwrite`; or an `OSError` happened while writing (the message says
            whether the disk was full and how much had been written).
    """
    out = Path(out).absolute()
    check_output_free(out, overwrite=overwrite)
    try:
        with atomic_dir(out, overwrite=True) as tmp:
            try:
                yield tmp
            except OSError as exc:
                raise _write_error(exc, dir_size_bytes(tmp), out) from exc
    except (ExportError, KeyboardInterrupt):
        raise
    except OSError as exc:  # creating the temp folder or the final rename
        raise ExportError(f"could not write the export at {str(out)!r}: {exc}. Nothing was left behind.") from exc


def _write_error(exc: OSError, written: int, out: Path) -> ExportError:
    if exc.errno == errno.ENOSPC:
        return ExportError(
            f"the disk filled up while writing the export to {str(out.parent)!r} "
            f"({written / 2**30:.2f} GiB had been written when it failed). Nothing was left behind; free space "
            "on that disk (an export needs about the model's size, GGUF and merged-4bit exports about twice "
            "that while they run) or choose an output folder on another disk"
        )
    return ExportError(f"writing the export to {str(out)!r} failed: {exc}. Nothing was left behind.")
