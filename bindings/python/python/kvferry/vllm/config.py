"""The connector's settings, read from `kv_connector_extra_config`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

GIB = 1 << 30


@dataclass(frozen=True)
class OffloadConfig:
    dram_bytes: int
    disk_dir: str | None
    disk_bytes: int
    policy: str
    admit_after: int
    # Empty each rank's disk directory at start instead of finding its blocks again.
    clear_on_start: bool
    # The tier every engine shares: `TierStore`'s remote settings without the namespace, which each
    # rank derives from its engine and layout (plus an optional "namespace" given here).
    remote: dict[str, Any] | None = None


@dataclass(frozen=True)
class ConnectorConfig:
    engine_id: str
    # P/D disaggregation: serve finished prefills to decode engines, pull blocks given their params.
    pd: bool
    offload: OffloadConfig | None
    # Where this engine's transfer agents and its handshake side channel listen.
    host: str
    port: int
    lease_seconds: float
    timeout_seconds: float
    shm: bool
    fabric_provider: str | None
    # The cluster secret every engine's agents and side channel prove: a file named here (a secret
    # never sits in the config itself, which vLLM logs), else the environment (KVFERRY_SECRET,
    # KVFERRY_SECRET_FILE); "auth": "none" turns it off on a closed network.
    secret_file: str | None
    auth: str
    # Any of the agent's own options by key (`kvferry info` lists them), e.g. `fabric.domains` to
    # pick the NIC the libfabric transport uses: passed to `kvferry.Agent(options=...)`.
    agent_options: dict[str, Any] = field(default_factory=dict)

    def auth_kwargs(self) -> dict[str, Any]:
        """The `secret`/`auth` arguments of `kvferry.Agent` and `kvferry.authenticate_socket`."""
        if self.secret_file is None:
            return {"auth": self.auth}
        with open(self.secret_file, "rb") as f:
            return {"secret": f.read().rstrip(), "auth": self.auth}

    @staticmethod
    def from_extra(engine_id: str, kv_role: str | None, extra: Mapping[str, Any] | None) -> "ConnectorConfig":
        extra = dict(extra or {})
        known = {"pd", "offload", "host", "port", "lease_seconds", "timeout_seconds", "shm", "fabric_provider"}
        known |= {"secret_file", "auth", "agent_options"}
        unknown = set(extra) - known
        if unknown:
            raise ValueError(f"unknown kv_connector_extra_config keys {sorted(unknown)}; known: {sorted(known)}")
        offload = extra.get("offload")
        pd = bool(extra.get("pd", kv_role in ("kv_producer", "kv_consumer", "kv_both")))
        if not pd and offload is None:
            raise ValueError('kv_connector_extra_config enables neither "pd" nor "offload"')
        return ConnectorConfig(
            engine_id=engine_id,
            pd=pd,
            offload=None if offload is None else _offload(offload),
            host=str(extra.get("host", os.environ.get("VLLM_HOST_IP") or "127.0.0.1")),
            port=_non_negative(extra, "port", 0),
            lease_seconds=float(_positive(extra, "lease_seconds", 120.0)),
            timeout_seconds=float(_positive(extra, "timeout_seconds", 30.0)),
            shm=bool(extra.get("shm", True)),
            fabric_provider=extra.get("fabric_provider"),
            secret_file=None if extra.get("secret_file") is None else str(extra["secret_file"]),
            auth=_choice(extra, "auth", ("env", "none"), "env"),
            agent_options=_agent_options(extra.get("agent_options", {})),
        )


def _agent_options(d: Any) -> dict[str, Any]:
    """Checked here only for shape; the agent's parser checks keys and values when it starts."""
    if not isinstance(d, Mapping) or not all(isinstance(k, str) for k in d):
        raise ValueError(f"agent_options must map option keys to values, got {d!r}")
    return dict(d)


def _choice(d: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    value = d.get(key, default)
    if value not in choices:
        raise ValueError(f'"{key}" must be one of {list(choices)}, not {value!r}')
    return value


def _offload(d: Any) -> OffloadConfig:
    if not isinstance(d, Mapping):
        raise ValueError(f'"offload" must be an object, not {d!r}')
    known = {"dram_bytes", "dram_gib", "disk_dir", "disk_bytes", "disk_gib", "policy", "admit_after", "clear_on_start"}
    known |= {"remote"}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f'unknown "offload" keys {sorted(unknown)}; known: {sorted(known)}')
    dram = _bytes(d, "dram", 4 * GIB)
    disk_dir = d.get("disk_dir")
    disk = _bytes(d, "disk", 0)
    if disk_dir is not None and disk == 0:
        raise ValueError('"offload.disk_dir" needs "disk_bytes" or "disk_gib"')
    return OffloadConfig(
        dram_bytes=dram,
        disk_dir=None if disk_dir is None else str(disk_dir),
        disk_bytes=disk,
        policy=str(d.get("policy", "lru")),
        admit_after=int(_positive(d, "admit_after", 1)),
        clear_on_start=_bool(d, "clear_on_start", False),
        remote=None if d.get("remote") is None else _remote(d["remote"]),
    )


# The remote settings an engine may give; the rest of `kvferry.TierStore`'s are derived.
_REMOTE_KEYS = {"url", "path", "namespace", "timeout", "concurrency", "max_upload_bytes", "failures_to_open"}
_REMOTE_KEYS |= {"retry_after", "options"}


def _remote(d: Any) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ValueError(f'"offload.remote" must be an object, not {d!r}')
    unknown = set(d) - _REMOTE_KEYS
    if unknown:
        raise ValueError(f'unknown "offload.remote" keys {sorted(unknown)}; known: {sorted(_REMOTE_KEYS)}')
    if ("url" in d) == ("path" in d):
        raise ValueError('"offload.remote" takes either "url" (s3://bucket/prefix) or "path" (a shared directory)')
    return dict(d)


def _bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f'"{key}" must be true or false, not {value!r}')
    return value


def _bytes(d: Mapping[str, Any], stem: str, default: int) -> int:
    if f"{stem}_bytes" in d:
        return int(_non_negative(d, f"{stem}_bytes", 0))
    if f"{stem}_gib" in d:
        return int(float(_non_negative(d, f"{stem}_gib", 0)) * GIB)
    return default


def _positive(d: Mapping[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'"{key}" must be a positive number, not {value!r}')
    return value


def _non_negative(d: Mapping[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f'"{key}" must be a non-negative number, not {value!r}')
    return value
