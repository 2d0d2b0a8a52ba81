"""API keys (compared in constant time) and the audit log (JSON lines, never the text)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

from moeserve.frontend.errors import Unauthorized

API_KEY_ENV = "MOESERVE_API_KEY"


def key_id(key: str) -> str:
    """A short, non-secret name for a key (what logs and the audit trail show)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class ApiKeys:
    """The keys that may use the server; none = open. ``check`` returns the matching key's id.

    NOTE: every configured key is compared with ``hmac.compare_digest`` on SHA-256 digests (equal lengths),
    with no early exit, so the time taken does not depend on how much of a key matched or which one did.
    """

    def __init__(self, keys: list[str]):
        keys = [k for k in keys if k]
        self._digests = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in keys]

    @classmethod
    def from_args(cls, api_key: str | None) -> ApiKeys:
        """``--api-key`` (comma-separated for several), else the MOESERVE_API_KEY environment variable."""
        raw = api_key if api_key else os.environ.get(API_KEY_ENV, "")
        return cls([k.strip() for k in raw.split(",") if k.strip()])

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, presented: str | None) -> str | None:
        """The key id for a valid key (None when auth is off); raises Unauthorized otherwise."""
        if not self._digests:
            return None
        if not isinstance(presented, str) or not presented:
            raise Unauthorized("an API key is required (HTTP: 'Authorization: Bearer KEY'; RPC: 'api_key')")
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for known, kid in self._digests:
            if hmac.compare_digest(digest, known):
                found = kid
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    def check_bearer(self, header: str | None) -> str | None:
        if not self._digests:
            return None
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("an API key is required: 'Authorization: Bearer KEY'")
        return self.check(token.strip())


def prompt_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(token_ids, separators=(",", ":")).encode()).hexdigest()


class AuditLog:
    """One JSON object per finished request: time, request id, key id, protocol, prompt hash, token counts,
    outcome. Never any text. Thread-safe appends, flushed per line."""

    def __init__(self, path: Path | str | None):
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, **record: Any) -> None:
        if self._file is None:
            return
        line = json.dumps({"time": round(time.time(), 3), **record}, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
