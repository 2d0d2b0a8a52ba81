"""Reading stored blocks straight into their destination: a minimal Redis-protocol (RESP2) ``MGET`` client
whose bulk replies are received with ``socket.recv_into`` into caller-given buffers (the cache rows on a
CPU, a pinned staging buffer on an accelerator), and a small pool of such connections.

redis-py (with hiredis) parses every value into a new ``bytes`` object, which then has to be copied to where
it goes: for latent blocks of megabytes that copy, and the allocation, are a large part of a load. Here the
only copy is the kernel's, from the socket into the destination. Only ``MGET``, ``GETRANGE`` (and ``AUTH`` /
``SELECT`` on connect) are spoken; every other call stays on redis-py (kvstore/store.py).
"""

from __future__ import annotations

import queue
import socket
import struct
from collections.abc import Callable, Sequence
from urllib.parse import unquote, urlsplit

_MAX_IOV = 512  # buffers one recvmsg_into scatters over (Linux takes up to 1024)


class RespError(ConnectionError):
    """The server's answer is not what the protocol says, or the server refused (an OSError: the store's
    circuit breaker counts it as a failed call)."""


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class RespConnection:
    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        if parts.scheme == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = parts.path
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.sock.settimeout(timeout_s)
        self.sock.connect(address)  # type: ignore[arg-type]
        # NOTE: blocking, with the timeout kept by the kernel (SO_RCVTIMEO / SO_SNDTIMEO) rather than by Python's
        # poll before every call: a value is then received in one recv_into (MSG_WAITALL) that lets go of the
        # GIL once, not once per socket buffer's worth; with other threads busy (the engine's loop, the other
        # readers) each taking back of the GIL can wait a switch interval
        self.sock.settimeout(None)
        tv = struct.pack("ll", int(timeout_s), int(timeout_s % 1 * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.timeout_s = timeout_s
        self._buf = bytearray()
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            auth = [b"AUTH", *([user.encode()] if user else []), unquote(parts.password).encode()]
            self._simple(_command(*auth))
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        if db and db != "0":
            self._simple(_command(b"SELECT", db.encode()))

    def _simple(self, cmd: bytes) -> None:
        self.sock.sendall(cmd)
        line = self._line()
        if not line.startswith(b"+"):
            raise RespError(f"the store refused: {line.decode(errors='replace')}")

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            raise self._timed_out() from None
        if not chunk:
            raise RespError("the store closed the connection")
        self._buf += chunk

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 2]
                return line
            self._fill()

    def _read_into(self, parts: Sequence[memoryview]) -> None:
        """Exactly the parts' lengths, in order: what is buffered first, then straight from the socket, scattered
        over the parts by one ``recvmsg_into`` (a value received into a CPU cache is a row per layer: one system
        call, and one release of the GIL, for all of them)."""
        views = [memoryview(v).cast("B") for v in parts if len(v)]
        i = 0
        while self._buf and i < len(views):
            n = min(len(views[i]), len(self._buf))
            views[i][:n] = self._buf[:n]
            del self._buf[:n]
            views[i] = views[i][n:]
            i += not views[i]
        while i < len(views):
            try:
                got = self.sock.recvmsg_into(views[i:i + _MAX_IOV], 0, socket.MSG_WAITALL)[0]
            except BlockingIOError:
                raise self._timed_out() from None
            if not got:
                raise RespError("the store closed the connection")
            while got:
                n = min(got, len(views[i]))
                views[i] = views[i][n:]
                got -= n
                i += not views[i]

    def _timed_out(self) -> TimeoutError:
        return TimeoutError(f"the store sent nothing for {self.timeout_s:g} s")

    def mget_into(self, keys: Sequence[str], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        """``MGET keys``; value i is received into ``dests[i]`` (its parts in order) when its length is
        theirs. Returns each value's length (-1: missing; another length: skipped, its bytes not kept)."""
        self.sock.sendall(_command(b"MGET", *(k.encode() for k in keys)))
        head = self._line()
        if head[:1] != b"*" or int(head[1:]) != len(keys):
            raise RespError(f"unexpected MGET reply {head[:64]!r}")
        return self._values(dests, b"MGET")

    def getrange_into(self, ranges: Sequence[tuple[str, int]], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        """``GETRANGE key start end`` for each (key, start) of ``ranges``, pipelined (one round trip; a layer-wise
        load reads one layer's slice of its blocks); bytes ``[start, start + len(dests[i]))`` go into
        ``dests[i]``. Returns each range's length (a missing key or a short value: less than asked, not kept)."""
        cmds = []
        for (key, start), parts in zip(ranges, dests):
            end = start + sum(len(p) for p in parts) - 1
            cmds.append(_command(b"GETRANGE", key.encode(), b"%d" % start, b"%d" % end))
        self.sock.sendall(b"".join(cmds))
        return self._values(dests, b"GETRANGE")

    def _values(self, dests: Sequence[Sequence[memoryview]], what: bytes) -> list[int]:
        lengths = []
        for parts in dests:
            line = self._line()
            if line[:1] != b"$":
                raise RespError(f"unexpected {what.decode()} value {line[:64]!r}")
            size = int(line[1:])
            lengths.append(size)
            if size < 0:
                continue
            crlf = memoryview(bytearray(2))  # the value's \r\n
            if size == sum(len(p) for p in parts):
                self._read_into([*parts, crlf])
            else:
                self._read_into([memoryview(bytearray(size)), crlf])
        return lengths

    def close(self) -> None:
        self.sock.close()


class RespPool:
    """Up to ``size`` connections, made when first needed; one that failed is dropped, not reused."""

    def __init__(self, url: str, timeout_s: float, size: int):
        self.url, self.timeout_s, self.size = url, timeout_s, size
        self._idle: queue.LifoQueue[RespConnection] = queue.LifoQueue()

    def mget_into(self, keys: Sequence[str], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        return self._with(lambda conn: conn.mget_into(keys, dests))

    def getrange_into(self, ranges: Sequence[tuple[str, int]], dests: Sequence[Sequence[memoryview]]) -> list[int]:
        return self._with(lambda conn: conn.getrange_into(ranges, dests))

    def _with(self, call: Callable[[RespConnection], list[int]]) -> list[int]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = RespConnection(self.url, self.timeout_s)
        try:
            lengths = call(conn)
        except BaseException:
            conn.close()
            raise
        self._idle.put(conn)
        return lengths

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
