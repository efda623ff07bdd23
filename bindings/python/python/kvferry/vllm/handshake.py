"""The engine's side channel: decode workers fetch a prefill engine's per-rank agent metadata and
cache layout from its scheduler, once per remote engine.

One JSON document per connection, length-prefixed, so a reader never mistakes a truncated answer
(a prefill engine dying mid-reply) for a valid one.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

from kvferry.vllm.layout import KvLayout, LayoutError

_MAX_DOC = 64 << 20
VERSION = 1


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
    layout: KvLayout

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "total_heads": self.total_heads,
            "agent_metadata": base64.b64encode(self.agent_metadata).decode(),
            "layout": self.layout.to_dict(),
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
                layout=KvLayout.from_dict(d["layout"]),
            )
        except (KeyError, TypeError, ValueError, LayoutError) as e:
            raise HandshakeError(f"malformed rank metadata: {e}") from e


class HandshakeServer:
    """Serves every rank's `RankInfo` to whoever connects; runs until `close()`."""

    def __init__(self, host: str, port: int, ranks: dict[int, RankInfo]):
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
                try:
                    conn.settimeout(5.0)
                    conn.sendall(self._payload)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()


def fetch(host: str, port: int, timeout: float) -> dict[int, RankInfo]:
    """Every rank of the engine whose side channel is at `host:port`."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            header = _read_exact(conn, 4)
            (size,) = struct.unpack(">I", header)
            if size > _MAX_DOC:
                raise HandshakeError(f"{host}:{port} announced a {size}-byte handshake")
            doc = json.loads(_read_exact(conn, size))
    except (OSError, ValueError) as e:
        raise HandshakeError(f"handshake with {host}:{port} failed: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("ranks"), dict):
        raise HandshakeError(f"{host}:{port} is not a kvferry side channel of version {VERSION}")
    try:
        return {int(r): RankInfo.from_dict(info) for r, info in doc["ranks"].items()}
    except ValueError as e:
        raise HandshakeError(f"{host}:{port} sent a malformed rank: {e}") from e


def _read_exact(conn: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = conn.recv(n - len(chunks))
        if not chunk:
            raise HandshakeError(f"connection closed after {len(chunks)} of {n} bytes")
        chunks += chunk
    return bytes(chunks)
