"""Wrong API keys counted per client address, so guessing keys gets slow (429) fast."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque


class FailedAuthLimiter:
    """At most ``limit`` wrong keys per client address in any ``window_s`` seconds.

    Memory is bounded: the least recently seen of more than ``max_addresses`` addresses is
    forgotten (an attacker with that many addresses is a job for the network, not for us).
    """

    def __init__(self, limit: int, window_s: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        if self.limit <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            failures = self._failures.get(address)
            if failures is None:
                return None
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            if len(failures) < self.limit:
                return None
            return failures[0] + self.window_s - now

    def record_failure(self, address: str) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            failures = self._failures.pop(address, None) or deque(maxlen=self.limit)
            failures.append(time.monotonic())
            self._failures[address] = failures
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
