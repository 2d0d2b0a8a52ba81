"""A circuit breaker for the shared store: after ``failure_threshold`` failed calls in a row the store is
bypassed (open); every ``probe_interval_s`` one call is let through as a probe (half open), and its success
closes the breaker again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, probe_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1 or probe_interval_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and probe_interval_s > 0")
        self.failure_threshold = failure_threshold
        self.probe_interval_s = probe_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self.state = CLOSED
        self.failures = 0  # in a row
        self.num_opened = 0
        self.num_closed = 0  # times it closed again after being open
        self._next_probe = 0.0

    def allow(self) -> bool:
        """Whether a call may go to the store now (an open breaker lets one probe through per interval)."""
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == OPEN and self._clock() >= self._next_probe:
                self.state = HALF_OPEN
                return True
            return False

    def success(self) -> None:
        with self._lock:
            if self.state != CLOSED:
                self.num_closed += 1
            self.state, self.failures = CLOSED, 0

    def failure(self) -> bool:
        """Record a failed call; True when this failure opened the breaker."""
        with self._lock:
            self.failures += 1
            opened = self.state == CLOSED and self.failures >= self.failure_threshold
            if opened:
                self.num_opened += 1
            if opened or self.state == HALF_OPEN:  # a failed probe keeps it open for another interval
                self.state = OPEN
                self._next_probe = self._clock() + self.probe_interval_s
            return opened
