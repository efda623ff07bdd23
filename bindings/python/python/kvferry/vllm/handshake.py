"""The engine's side channel: decode workers fetch a prefill engine's per-rank agent metadata and
cache layout from its scheduler, once per remote engine.

Each connection starts with kvferry's cluster-secret handshake (`kvferry.authenticate_socket`, the
code every agent channel runs), because the document carries agent metadata and so registration
keys: only an engine that proves the secret gets it, and a decode engine only trusts a prefill
engine that proves it too. Then one JSON document, length-prefixed, so a reader never mistakes a
truncated answer (a prefill engine dying mid-reply) for a valid one.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvferry import KvferryError, authenticate_socket
from kvferry.vllm.layout import KvLayout, LayoutError

logger = logging.getLogger(__name__)

_MAX_DOC = 64 << 20
# 2: a layout per KV cache group.
VERSION = 2
# A client has this long, handshake and reply together, before the next one is served.
_SERVE_SECONDS = 5.0


class HandshakeError(ConnectionError):
    """The remote engine did not answer, or answered something that is not a kvferry handshake."""


@dataclass(frozen=True)
class RankInfo:
    """What a peer needs to read one rank's blocks."""

    engine_id: str
    tp_rank: int
    tp_size: int
    total_heads: int
    agent_metadata: bytes
    # One per KV cache group, in vLLM's order.
    layouts: tuple[KvLayout, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "total_heads": self.total_heads,
            "agent_metadata": base64.b64encode(self.agent_metadata).decode(),
            "layouts": [layout.to_dict() for layout in self.layouts],
        }

    @staticmethod
    def from_dict(d: Any) -> "RankInfo":
        try:
            return RankInfo(
                engine_id=str(d["engine_id"]),
                tp_rank=int(d["tp_rank"]),
                tp_size=int(d["tp_size"]),
                total_heads=int(d["total_heads"]),
                agent_metadata=base64.b64decode(d["agent_metadata"], validate=True),
                layouts=tuple(KvLayout.from_dict(x) for x in d["layouts"]),
            )
        except (KeyError, TypeError, ValueError, LayoutError) as e:
            raise HandshakeError(f"malformed rank metadata: {e}") from e


class HandshakeServer:
    """Serves every rank's `RankInfo` to every engine that proves the cluster secret; runs until
    `close()`. `auth` holds `authenticate_socket`'s `secret`/`auth` arguments."""

    def __init__(self, host: str, port: int, ranks: dict[int, RankInfo], auth: dict[str, Any]):
        self._auth = auth
        doc = json.dumps({"version": VERSION, "ranks": {str(r): info.to_dict() for r, info in ranks.items()}})
        self._payload = struct.pack(">I", len(doc)) + doc.encode()
        self._sock = socket.create_server((host, port), reuse_port=False)
        self._sock.settimeout(0.5)
        self.host, self.port = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvferry-handshake", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                deadline = time.monotonic() + _SERVE_SECONDS
                try:
                    conn.settimeout(None)
                    authenticate_socket(conn.fileno(), "server", _SERVE_SECONDS, **self._auth)
                    _send_by(conn, self._payload, deadline)
                except (OSError, KvferryError) as e:
                    logger.debug("kvferry: handshake side channel: %s", e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()


def fetch(host: str, port: int, timeout: float, auth: dict[str, Any]) -> dict[int, RankInfo]:
    """Every rank of the engine whose side channel is at `host:port`, which must prove the secret."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.settimeout(None)
            authenticate_socket(conn.fileno(), "client", max(deadline - time.monotonic(), 0.0), **auth)
            _set_timeout_by(conn, deadline)
            header = _read_exact(conn, 4, deadline)
            (size,) = struct.unpack(">I", header)
            if size > _MAX_DOC:
                raise HandshakeError(f"{host}:{port} announced a {size}-byte handshake")
            doc = json.loads(_read_exact(conn, size, deadline))
    except (OSError, ValueError, KvferryError) as e:
        raise HandshakeError(f"handshake with {host}:{port} failed: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("ranks"), dict):
        raise HandshakeError(f"{host}:{port} is not a kvferry side channel of version {VERSION}")
    try:
        return {int(r): RankInfo.from_dict(info) for r, info in doc["ranks"].items()}
    except ValueError as e:
        raise HandshakeError(f"{host}:{port} sent a malformed rank: {e}") from e


def _set_timeout_by(conn: socket.socket, deadline: float) -> None:
    """Each call on `conn` gets only what is left before `deadline`, so a trickling peer cannot
    stretch the exchange."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the handshake's deadline passed")
    conn.settimeout(left)


def _send_by(conn: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        _set_timeout_by(conn, deadline)
        view = view[conn.send(view) :]


def _read_exact(conn: socket.socket, n: int, deadline: float) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        _set_timeout_by(conn, deadline)
        chunk = conn.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            raise HandshakeError(f"connection closed after {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)
