"""How much memory a rollout's KV cache takes, and how much the device has: checked before any work.

    kv_cache_bytes(rows=4 * 512, tokens=1280, layers=30, kv_heads=3, head_dim=64, dtype_bytes=4)

The embedded engine keeps one KV row per active path, so a batch of P prompts grown to width W holds
up to P x W rows of (longest prompt + response budget) positions, each position L layers x 2
(keys, values) x kv heads x head dim values. `available_memory` is what the device could still give:
MemAvailable (Linux) or the physical memory on a CPU, free plus cached-but-unused memory on CUDA.
"""

from __future__ import annotations

import os
from typing import Optional

import torch


def kv_cache_bytes(rows: int, tokens: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of a KV cache of `rows` sequences of `tokens` positions."""
    return rows * tokens * layers * 2 * kv_heads * head_dim * dtype_bytes


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes the device can still allocate, or None when it cannot be told."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
