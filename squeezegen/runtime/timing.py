"""Timing helpers: a GPU runs asynchronously, so a timer must wait for it before reading the clock."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer reads real time (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Seconds per named phase, only when enabled (timing a GPU costs a synchronisation)."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device, self.enabled, self.laps = device, enabled, {}
        self.last = time.perf_counter() if enabled else 0.0

    def lap(self, name: str) -> None:
        """Add the time since the previous lap to phase `name` (as `name_s`)."""
        if not self.enabled:
            return
        synchronize(self.device)
        now = time.perf_counter()
        key = f"{name}_s"
        self.laps[key] = self.laps.get(key, 0.0) + now - self.last
        self.last = now
