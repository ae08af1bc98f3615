"""Damaged swap files for the NVMe tier tests: what is done to a file, what the error says."""

from __future__ import annotations

import os
from pathlib import Path


SWAP_FILE_FAULTS = {  # how a swap file is damaged, and what the error must then say
    "corrupt": r"is corrupted: its checksum does not match",
    "truncate": r"is truncated: \d+ of \d+ bytes",
    "delete": r"is missing",
}


def damage_swap_file(path: Path, fault: str) -> None:
    """Damage a swap file as a failing disk or a careless user would (see SWAP_FILE_FAULTS)."""
    if fault == "corrupt":
        raw = bytearray(path.read_bytes())
        raw[0] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif fault == "truncate":
        os.truncate(path, 512)
    else:
        path.unlink()
