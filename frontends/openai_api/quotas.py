"""Per-key quotas: a pure limiter over sliding one-minute windows, given the time by its caller.

No sockets and no clock of its own, so every rule is tested in milliseconds with made-up times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW = 60.0  # seconds: requests_per_minute and tokens_per_minute count the last minute, sliding
CONCURRENCY_RETRY = 1.0  # seconds: an open request frees its slot whenever it ends; nothing better to say


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """One API key: its name (for metrics and logs, never the secret) and its limits (None: none)."""

    name: str
    secret: str = field(repr=False)  # never in a repr, so never in a log line or traceback
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt + completion tokens
    max_concurrent: int | None = None
    models: frozenset[str] | None = None  # None: every model
    priority: int = 0  # the default priority of its requests

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError(f"key '{self.name}': the secret must not be empty")
        for limit in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            value = getattr(self, limit)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"key '{self.name}': {limit} must be a positive integer, not {value!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or \
                not -2**31 <= self.priority < 2**31:
            raise ValueError(f"key '{self.name}': priority must be a 32-bit integer, not {self.priority!r}")

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused now, and in how many seconds the window frees a slot."""

    reason: str
    retry_after: float


@dataclass(slots=True)
class _Usage:
    starts: deque[float] = field(default_factory=deque)  # when each request of the last minute was admitted
    spent: deque[tuple[float, int]] = field(default_factory=deque)  # (when it ended, its tokens)
    num_tokens: int = 0  # the sum of `spent`
    num_open: int = 0


class QuotaLimiter:
    """Admits and releases requests per key name; usage survives a reload that keeps the name."""

    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}

    def admit(self, policy: KeyPolicy, now: float) -> Refusal | None:
        """Admit a request (the caller must `release` it) or say why not."""
        usage = self._usage.setdefault(policy.name, _Usage())
        self._forget(usage, now)
        if policy.max_concurrent is not None and usage.num_open >= policy.max_concurrent:
            return Refusal(f"{policy.max_concurrent} requests open at once is this key's limit", CONCURRENCY_RETRY)
        if policy.requests_per_minute is not None and len(usage.starts) >= policy.requests_per_minute:
            # the slot frees when the oldest request that still counts leaves the window
            index = len(usage.starts) - policy.requests_per_minute
            return Refusal(f"{policy.requests_per_minute} requests per minute is this key's limit",
                           usage.starts[index] + WINDOW - now)
        if policy.tokens_per_minute is not None and usage.num_tokens >= policy.tokens_per_minute:
            return Refusal(f"{policy.tokens_per_minute} tokens per minute is this key's limit",
                           self._tokens_free_at(usage, policy.tokens_per_minute) - now)
        usage.starts.append(now)
        usage.num_open += 1
        return None

    def release(self, policy: KeyPolicy, num_tokens: int, now: float) -> None:
        """An admitted request ended having used `num_tokens` (prompt + completion)."""
        usage = self._usage.setdefault(policy.name, _Usage())
        usage.num_open = max(0, usage.num_open - 1)
        if num_tokens > 0:
            usage.spent.append((now, num_tokens))
            usage.num_tokens += num_tokens
        self._forget(usage, now)

    def num_open(self, name: str) -> int:
        usage = self._usage.get(name)
        return 0 if usage is None else usage.num_open

    def keep_only(self, names: set[str]) -> None:
        """Drop the usage of keys no longer configured (idle ones only: open requests still release)."""
        for name in [n for n, u in self._usage.items() if n not in names and u.num_open == 0]:
            del self._usage[name]

    @staticmethod
    def _forget(usage: _Usage, now: float) -> None:
        while usage.starts and usage.starts[0] <= now - WINDOW:
            usage.starts.popleft()
        while usage.spent and usage.spent[0][0] <= now - WINDOW:
            usage.num_tokens -= usage.spent.popleft()[1]

    @staticmethod
    def _tokens_free_at(usage: _Usage, limit: int) -> float:
        """When enough of the window's tokens have left it for the sum to be under `limit`."""
        remaining = usage.num_tokens
        for ended, num_tokens in usage.spent:
            remaining -= num_tokens
            if remaining < limit:
                return ended + WINDOW
        return usage.spent[-1][0] + WINDOW  # not reached: num_tokens >= limit means spent is not empty
