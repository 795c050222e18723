"""Memory sizes as people write them ("8GiB", "8GB", "7.5 GiB", "8000MiB") ↔ bytes."""

from __future__ import annotations

import re

from slimtune.errors import ConfigError

# Decimal (GB = 10^9) and binary (GiB = 2^30) units both occur in the wild: nvidia-smi prints MiB, vendors sell
# GB. A bare K/M/G/T is read as binary, the way PyTorch and nvidia-smi report memory.
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*$", re.IGNORECASE)


def parse_memory_size(text) -> int:
    """Bytes in a size string such as "8GiB", "8GB", "7.5GiB", "8000MiB" (case-insensitive, space allowed).

    Raises:
        ConfigError: not a positive number followed by one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB (or K/M/G/T,
            read as binary units). A bare number is refused: 8 could mean GiB or bytes.
    """
    if isinstance(text, bool) or not isinstance(text, str):
        raise ConfigError(f"max_memory must be a size string such as '8GiB' (got {text!r})")
    match = _PATTERN.match(text)
    if not match or match.group(2).lower() not in _UNITS:
        hint = " (add a unit)" if re.fullmatch(r"\s*[\d.]+\s*", text) else ""
        raise ConfigError(f"cannot read the memory size {text!r}{hint}: write a number and a unit, e.g. 8GiB, "
                          "8GB, 7.5GiB or 8000MiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if size < 1:
        raise ConfigError(f"memory size {text!r} must be more than zero")
    return int(size)


def format_gib(n_bytes: float) -> str:
    """'4.92 GiB'."""
    return f"{n_bytes / 2**30:.2f} GiB"
