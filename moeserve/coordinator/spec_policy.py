"""When speculation pays: drafts only where a step with them emits tokens faster than a step without.

A verify step computes k + 1 tokens per sequence and an MTP pass besides; it pays while the step is bound
by reading the weights (small batches) and the drafts are accepted often enough. Neither is known in
advance on a given machine and model, so both are measured: the engine reports each pure decode step (no
prefill chunk) as (batch size, with drafts or not, tokens emitted, seconds), and the policy keeps, per
batch-size bucket (powers of two), a moving average of tokens per second of each mode. A bucket measures
plain steps first (so nothing is drafted before a pure decode step was timed, e.g. while a large batch is
still prefilling), then steps with drafts, then drafts only while they are ``MARGIN`` faster; every
``probe_interval`` steps it runs the other mode once, so a change in acceptance (or in the machine's load)
turns speculation back on or off.
"""

from __future__ import annotations

EMA_WEIGHT = 0.25  # of the newest step in the moving averages
MARGIN = 0.05  # drafts must emit tokens this much faster than plain steps to be kept on


def batch_bucket(batch_size: int) -> int:
    """The power of two at or above ``batch_size``."""
    return 1 << max(0, batch_size - 1).bit_length()


class SpecPolicy:
    def __init__(self, probe_interval: int):
        self.probe_interval = probe_interval
        self.rate: dict[tuple[int, bool], float] = {}  # (bucket, with drafts) -> tokens per second
        self.steps: dict[int, int] = {}  # decisions taken per bucket

    def wants_drafts(self, batch_size: int) -> bool:
        """Whether the next step of ``batch_size`` decoding sequences should carry drafts."""
        bucket = batch_bucket(batch_size)
        n = self.steps[bucket] = self.steps.get(bucket, 0) + 1
        on, off = self.rate.get((bucket, True)), self.rate.get((bucket, False))
        if off is None:
            return False
        if on is None:
            return True
        better = on > off * (1 + MARGIN)
        return (not better) if n % self.probe_interval == 0 else better

    def observe(self, batch_size: int, with_drafts: bool, num_tokens: int, seconds: float) -> None:
        """One pure decode step's result."""
        if seconds <= 0:
            return
        key = (batch_bucket(batch_size), with_drafts)
        rate = num_tokens / seconds
        old = self.rate.get(key)
        self.rate[key] = rate if old is None else (1 - EMA_WEIGHT) * old + EMA_WEIGHT * rate

    def snapshot(self) -> dict[str, float]:
        return {f"{'on' if d else 'off'}@{b}": r for (b, d), r in sorted(self.rate.items())}
