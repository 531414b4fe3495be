"""Token-budget batching: forward passes sized by padded tokens, with a budget that adapts as it runs.

Rows are sorted by length and cut into groups whose ``rows * longest`` stays within the budget, so
padding is small and a batch of short chunks holds many rows. ``TokenBudget`` grows the budget while
throughput improves and memory has headroom, steps back when throughput falls, and halves it under
memory pressure or after an out-of-memory error. Its decisions are kept for the run report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

MAX_PADDING = 0.10  # a pass stops taking longer rows once padding would be over 10% of its tokens

# Where the budget stops growing unless embedding.max_batch_tokens says otherwise. On a CPU a bigger
# pass is no faster, only bigger (measured by benchmarks/pass_size.py; figures in the README); without
# a ceiling the budget followed throughput that rose as other stages let go of the cores, and a long
# run's memory depended on how far it had wandered. A GPU sizes its budget from measured memory.
CPU_MAX_TOKENS = 16_384
GPU_MAX_TOKENS = 262_144


def max_tokens(configured: int | None, *, device: str, initial: int) -> int:
    """The budget's ceiling: ``configured``, else the device's default, never below ``initial``."""
    if configured is not None:
        return configured
    return max(initial, CPU_MAX_TOKENS if device == "cpu" else GPU_MAX_TOKENS)


def group_end(
    order: list[int], lengths: list[int], start: int, budget: int, max_padding: float = MAX_PADDING
) -> int:
    """Where the pass that starts at ``order[start]`` ends (exclusive), rows sorted by length.

    A pass takes rows while ``rows * longest`` stays within ``budget`` and padding stays under
    ``max_padding`` of it; its first row always fits, however long.
    """
    end = start + 1
    real = max(lengths[order[start]], 1)
    while end < len(order):
        longest = max(lengths[order[end]], 1)  # sorted ascending: the new row is the longest
        padded = (end - start + 1) * longest
        if padded > budget or padded - (real + longest) > max_padding * padded:
            break
        real += longest
        end += 1
    return end


def plan_batches(lengths: list[int], budget: int, *, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Cut row indices, sorted by length, into passes of at most ``budget`` padded tokens.

    Args:
        lengths: tokens per row.
        budget: most ``len(group) * max(length in group)`` per group (a longer single row still
            gets a group of its own).
        max_padding: most share of a group's padded tokens that may be padding.

    Returns:
        Groups of indices into ``lengths``; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    start = 0
    while start < len(order):
        end = group_end(order, lengths, start, budget, max_padding)
        groups.append(order[start:end])
        start = end
    return groups


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception from a forward pass means it ran out of (host or device) memory."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    text = str(exc).lower()
    # cuBLAS and cuDNN report a failed workspace allocation with their own status codes.
    return (
        name == "OutOfMemoryError"
        or "out of memory" in text
        or "failed to allocate" in text
        or "status_alloc_failed" in text
    )


class TokenBudget:
    """Padded tokens per forward pass, tuned from measured throughput and memory headroom.

    Args:
        initial: the starting budget.
        minimum: the budget never goes below this (a single row may still exceed it).
        maximum: nor above this.
        adapt: False keeps the budget fixed (except for out-of-memory back-offs).
        free_memory: returns the fraction of memory still free (host RAM, or GPU memory).
        min_free: below this free fraction the budget shrinks instead of growing.
        window_tokens: padded tokens measured at one budget before it is judged.
        clock: a monotonic clock (tests pass a fake one).
    """

    GROW = 1.5
    SHRINK = 0.5

    def __init__(
        self,
        *,
        initial: int,
        minimum: int,
        maximum: int,
        adapt: bool = True,
        free_memory: Callable[[], float] | None = None,
        min_free: float = 0.15,
        window_tokens: int = 32_768,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.minimum, self.maximum = minimum, maximum
        self.value = max(minimum, min(initial, maximum))
        self.adapt = adapt
        self.free_memory = free_memory or (lambda: 1.0)
        self.min_free = min_free
        self.window_tokens = window_tokens
        self.clock = clock
        self.started = clock()
        self.best: tuple[float, int] | None = None  # (tokens/s, budget) of the best window so far
        self.ceiling = maximum  # lowered when growing stopped paying off or memory ran short
        self._tokens = self._padded = 0
        self._seconds = 0.0
        self._pressure_free: float | None = None  # free memory at the last memory-pressure shrink
        self.events: list[dict[str, Any]] = []
        self._log("start")

    def size_from_memory(self, *, bytes_per_token: float, free_bytes: float, share: float = 0.5) -> None:
        """Set the budget (and its ceiling) so that one pass takes at most ``share`` of the free
        memory, from the bytes per padded token a pass was measured to take."""
        if bytes_per_token <= 0:
            return
        fits = int(share * free_bytes / bytes_per_token)
        self.value = max(self.minimum, min(fits, self.maximum))
        self.ceiling = self.value
        self.best = None
        self._log(
            f"sized from memory: {bytes_per_token:.0f} bytes per token, {free_bytes / 2**30:.1f} GiB free"
        )

    def _log(self, reason: str, rate: float | None = None) -> None:
        point: dict[str, Any] = {
            "t": round(self.clock() - self.started, 3),
            "at": time.time(),
            "token_budget": self.value,
            "reason": reason,
        }
        if rate is not None:
            point["tokens_per_s"] = round(rate, 1)
        self.events.append(point)

    def observe(self, *, tokens: int, padded: int, seconds: float) -> None:
        """Account one forward pass; at the end of a window, decide the next budget."""
        self._tokens += tokens
        self._padded += padded
        self._seconds += seconds
        if self._padded < self.window_tokens or self._seconds <= 0:
            return
        rate = self._tokens / self._seconds
        self._tokens = self._padded = 0
        self._seconds = 0.0
        free = self.free_memory()
        if free < self.min_free:
            # Shrink once, then again only while free memory keeps falling: memory that something
            # else holds steady is no reason to go on halving (that ratchet ended at the minimum).
            if self._pressure_free is None or free < self._pressure_free - 0.01:
                self._pressure_free = free
                self.shrink("memory pressure", rate=rate)
            return
        if free >= 1.5 * self.min_free:
            self._pressure_free = None
        if not self.adapt:
            return
        if self.best is None or rate > self.best[0] * 1.03:
            self.best = (rate, self.value)
            if self.value < self.ceiling:
                self.value = min(int(self.value * self.GROW), self.ceiling)
                self._log("grow: throughput improved", rate)
            return
        if rate < self.best[0] * 0.9 and self.value != self.best[1]:
            # Bigger batches did not pay: go back to the best budget and stop growing past it.
            self.ceiling = max(self.best[1], self.minimum)
            self.value = self.best[1]
            self._log("back off: throughput fell", rate)
            return
        if self.value < self.ceiling and self.value == self.best[1]:
            self.ceiling = self.value  # flat: settled
            self._log("settled", rate)

    def shrink(self, reason: str, *, rate: float | None = None, below: int | None = None) -> None:
        """Halve the budget (to below ``below`` padded tokens, when given) and cap growth there."""
        target = int(self.value * self.SHRINK) if below is None else min(int(below * self.SHRINK), self.value)
        self.value = max(self.minimum, target)
        self.ceiling = max(self.minimum, self.value)
        self.best = None  # throughput measured at bigger budgets no longer applies
        self._log(f"shrink: {reason}", rate)


def host_free_fraction() -> float:
    import psutil

    memory = psutil.virtual_memory()
    return memory.available / memory.total


def cuda_free_bytes() -> tuple[int, int]:
    """(free, total) bytes of the current GPU, counting memory torch has cached but not in use as
    free: mem_get_info reports it as taken, yet the next pass reuses it."""
    import torch

    free, total = torch.cuda.mem_get_info()
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return free + max(cached, 0), total


def cuda_free_fraction() -> float:
    free, total = cuda_free_bytes()
    return free / total
