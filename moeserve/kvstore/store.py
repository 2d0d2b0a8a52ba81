"""The shared store's interface (``KVStore``: lookup of the longest stored prefix, batched get, batched put,
stats) and its backends: ``RedisStore`` (a real store server shared by nodes, through redis-py + hiredis) and
``MemoryStore`` (in this process; tests and the embedded case).

Every ``RedisStore`` call has a timeout and goes through a circuit breaker: a store that is down, slow or
refusing costs a ``StoreError`` (the caller recomputes), never a hang. Only a wrong or missing password is
fatal, and only at start (``check``), with a message that says so.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from moeserve.kvstore.breaker import CLOSED, CircuitBreaker
from moeserve.kvstore.resp_reader import RespPool

STORE_ENV = "MOESERVE_KV_STORE"  # the store's URL from the environment: its password stays off command lines

logger = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """A store call failed, timed out, or was skipped because the breaker is open: recompute instead."""


class StoreConfigError(ValueError):
    """The store cannot be used as configured (bad URL, wrong or missing password): a start-up error."""


@dataclass
class StoreStats:
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0  # failed or timed-out calls
    breaker_state: int = CLOSED  # 0 closed, 1 open, 2 half open
    breaker_opened: int = 0  # times the breaker opened


class KVStore(Protocol):
    def lookup(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are stored (the longest stored prefix)."""

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of ``keys`` in one round trip (None where missing)."""

    def put(self, items: Sequence[tuple[str, bytes | memoryview]]) -> None:
        """Store values in one round trip. A value may be a view of a buffer its caller reuses once ``put`` has
        returned (a rank's write slots): a store that keeps values in this process keeps copies."""

    def read_into(self, keys: Sequence[str], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        """The values of ``keys`` in one round trip, value i written into ``dests[i]`` (its parts in order)
        when its length is theirs. Returns each value's length (-1: missing; another length: not written).
        Safe to call from several threads (a server store reads over several connections)."""

    def read_ranges_into(self, ranges: Sequence[tuple[str, int]], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        """As ``read_into``, in one round trip, for bytes ``[start, start + len(dests[i]))`` of the value of each
        (key, start) of ``ranges`` (a layer-wise load reads one layer's slice of its blocks). Returns each
        range's length (short: missing, nothing written)."""

    def stats(self) -> StoreStats: ...


STORE_SCHEMES = ("redis", "rediss", "unix", "memory")
# bytes of a writing rank's slots for blocks waiting to be written (--kv-store-write-buffer's default)
WRITE_BUFFER_BYTES = 256 << 20


def redact(url: str) -> str:
    """The URL (or comma-separated URLs) without its password (for logs and errors); the host and port as written,
    even a bad port."""
    if "," in url:
        return ",".join(redact(u) for u in url.split(","))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    return parts._replace(netloc=netloc).geturl()


def check_store_url(url: str) -> None:
    """StoreConfigError (naming the URL without its password) unless ``url`` is a store URL whose port, if
    any, is a number in 0..65535, or several separated by commas (keys spread over them: kvstore/sharded_store.py;
    a comma in a password is written %2C). A store that cannot be reached is not an error here: see ``check``."""
    if "," in url:
        for one in url.split(","):
            check_store_url(one)
        return
    parts = urlsplit(url)
    if parts.scheme not in STORE_SCHEMES:
        raise StoreConfigError(f"--kv-store must be redis://[user:password@]host:port/db, got {redact(url)!r}")
    try:
        parts.port  # noqa: B018 - urllib parses the port only when asked
    except ValueError:
        port = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        raise StoreConfigError(f"--kv-store {redact(url)}: the port {port!r} is not a port number "
                               "(0-65535)") from None


def copy_ranges_into(get: Callable[[Sequence[str]], list[bytes | None]], ranges: Sequence[tuple[str, int]],
                     dests: Sequence[Sequence[memoryview]]) -> list[int]:
    """``read_ranges_into`` through ``get`` of whole values (one call, a copy each)."""
    keys = list(dict.fromkeys(key for key, _ in ranges))
    values = dict(zip(keys, get(keys)))
    cut = [None if values[k] is None else values[k][s:s + sum(len(p) for p in parts)]  # type: ignore[index]
           for (k, s), parts in zip(ranges, dests)]
    return [max(0, n) for n in copy_values_into(cut, dests)]


def copy_values_into(values: Sequence[bytes | None], dests: Sequence[Sequence[memoryview]]) -> list[int]:
    """``read_into`` from values already read (a copy each)."""
    lengths = []
    for value, parts in zip(values, dests):
        lengths.append(-1 if value is None else len(value))
        if value is not None and len(value) == sum(len(p) for p in parts):
            offset = 0
            for p in parts:
                p[:] = value[offset:offset + len(p)]
                offset += len(p)
    return lengths


class MemoryStore:
    """A bounded LRU of values in this process (same contract as a store server)."""

    def __init__(self, capacity_bytes: int = 1 << 30):
        self.capacity_bytes = capacity_bytes
        self._values: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = StoreStats()

    def lookup(self, keys: Sequence[str]) -> int:
        with self._lock:
            return next((i for i, k in enumerate(keys) if k not in self._values), len(keys))

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            out = [self._values.get(k) for k in keys]
            self._stats.bytes_read += sum(len(v) for v in out if v is not None)
            return out

    def put(self, items: Sequence[tuple[str, bytes | memoryview]]) -> None:
        with self._lock:
            for key, view in items:
                value = bytes(view)  # the caller may reuse a view's buffer
                self._bytes += len(value) - len(self._values.pop(key, b""))
                self._values[key] = value
                self._stats.bytes_written += len(value)
            while self._bytes > self.capacity_bytes and self._values:
                self._bytes -= len(self._values.popitem(last=False)[1])

    def read_into(self, keys: Sequence[str], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        return copy_values_into(self.get(keys), dests)

    def read_ranges_into(self, ranges: Sequence[tuple[str, int]], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        return copy_ranges_into(self.get, ranges, dests)

    def stats(self) -> StoreStats:
        return StoreStats(**vars(self._stats))


class RedisStore:
    """Values in a Redis-protocol server (redis-server, Valkey): ``redis://[user:password@]host:port/db``."""

    def __init__(self, url: str, timeout_s: float = 1.0, breaker: CircuitBreaker | None = None,
                 read_connections: int = 4):
        """``read_connections``: the pool ``read_into`` reads over (loads split into chunks read in parallel)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        check_store_url(url)
        self.url = redact(url)
        self.breaker = breaker or CircuitBreaker()
        self._stats = StoreStats()
        self._lock = threading.Lock()
        # NOTE: no retries inside redis-py: a failed call is one failure for the breaker, and costs one timeout
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                            health_check_interval=0)
        self.read_connections = read_connections
        # NOTE: TLS (rediss://) reads through redis-py and copies; plain TCP and unix sockets read in place
        self._reader = RespPool(url, timeout_s, read_connections) if not url.startswith("rediss") else None

    def check(self) -> bool:
        """At start: raise StoreConfigError for a wrong or missing password; False (with a warning, the breaker
        counting it) when the store cannot be reached now -- serving goes on and it is probed later."""
        import redis

        try:
            self._client.ping()
        except redis.exceptions.AuthenticationError as e:
            raise StoreConfigError(f"the KV store at {self.url} refused to authenticate ({e}); give its user "
                                   "and password in --kv-store redis://[user:password@]host:port/db") from e
        except redis.exceptions.ResponseError as e:
            raise StoreConfigError(f"the KV store at {self.url} refused PING: {e}") from e
        except (redis.exceptions.RedisError, OSError) as e:
            self.breaker.failure()
            logger.warning("KV store %s unreachable at start (%s): serving without it until it answers",
                           self.url, e)
            return False
        return True

    def _call(self, what: str, fn):
        import redis

        if not self.breaker.allow():
            raise StoreError(f"KV store {self.url}: circuit breaker open")
        try:
            result = fn()
        except redis.exceptions.ResponseError as e:  # the server is up but refused (e.g. out of memory)
            self._count_error()
            raise StoreError(f"KV store {self.url}: {what} refused: {e}") from e
        except (redis.exceptions.RedisError, OSError) as e:
            self._count_error()
            if self.breaker.failure():
                logger.warning("KV store %s failing (%s: %s): bypassed, probed every %.0f s", self.url, what, e,
                               self.breaker.probe_interval_s)
            raise StoreError(f"KV store {self.url}: {what} failed: {e}") from e
        if self.breaker.state != CLOSED:
            logger.warning("KV store %s answers again", self.url)
        self.breaker.success()
        return result

    def _count_error(self) -> None:
        with self._lock:
            self._stats.errors += 1

    def lookup(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0

        def run() -> list:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return pipe.execute()

        found = self._call("lookup", run)
        return next((i for i, n in enumerate(found) if not n), len(keys))

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        values = self._call("get", lambda: self._client.mget(list(keys)))
        with self._lock:
            self._stats.bytes_read += sum(len(v) for v in values if v is not None)
        return values

    def put(self, items: Sequence[tuple[str, bytes | memoryview]]) -> None:
        if not items:
            return

        def run() -> list:
            pipe = self._client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value)
            return pipe.execute()

        self._call("put", run)
        with self._lock:
            self._stats.bytes_written += sum(len(v) for _, v in items)

    def read_into(self, keys: Sequence[str], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        if not keys:
            return []
        reader = self._reader
        if reader is None:
            return copy_values_into(self.get(keys), dests)
        lengths = self._call("get", lambda: reader.mget_into(keys, dests))
        with self._lock:
            self._stats.bytes_read += sum(n for n in lengths if n > 0)
        return lengths

    def read_ranges_into(self, ranges: Sequence[tuple[str, int]], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        if not ranges:
            return []
        reader = self._reader
        if reader is None:  # NOTE: TLS: whole values through redis-py, then the ranges copied out
            return copy_ranges_into(self.get, ranges, dests)
        lengths = self._call("get", lambda: reader.getrange_into(ranges, dests))
        with self._lock:
            self._stats.bytes_read += sum(lengths)
        return lengths

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self._stats.bytes_read, self._stats.bytes_written, self._stats.errors,
                              self.breaker.state, self.breaker.num_opened)
