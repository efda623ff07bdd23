"""The shared tier: blocks one engine stored are external hits for another engine with empty DRAM
and disk, on a real S3 server (Garage, started by scripts/garage.sh) and on a shared directory;
corrupt objects are recomputed; a dead S3 server leaves every request served."""

import contextlib
import subprocess
import time
from pathlib import Path

import pytest
from conftest import HERE
from servers import complete, metrics, vllm_server
from test_offload import BLOCK, LENGTHS, PROMPTS, offline

GARAGE = HERE.parent.parent.parent / "scripts" / "garage.sh"
# Full blocks of every prompt, each stored once.
FULL_BLOCKS = sum(n // BLOCK for n in LENGTHS)


@contextlib.contextmanager
def garage(tmp_path: Path, monkeypatch):
    """A one-node Garage on loopback, its endpoint and credentials in this process's environment
    (engines read the usual AWS_* variables), stopped at the end."""
    where = tmp_path / "garage"
    out = subprocess.run(["bash", str(GARAGE), "start", str(where), "1"], capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        pytest.fail(f"garage.sh start failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    env = dict(line.split("=", 1) for line in (where / "env").read_text().splitlines() if "=" in line)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT", "AWS_ALLOW_HTTP"):
        monkeypatch.setenv(key, env[key])
    try:
        yield env, where
    finally:
        subprocess.run(["bash", str(GARAGE), "stop", str(where)], timeout=60)


def remote_offload(remote: dict) -> dict:
    return {"dram_bytes": 64 << 20, "remote": {**remote, "timeout": 5.0}}


def connector(offload: dict) -> dict:
    # A block that fails its load (a corrupt object, a dead server) is recomputed, not the request
    # failed: what an engine sharing a tier with others wants.
    return {
        "kv_connector": "KvferryConnector",
        "kv_connector_module_path": "kvferry.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"pd": False, "offload": offload},
    }


def run_engine(tmp_path, model_dir, offload: dict, name: str) -> dict:
    return offline(tmp_path, model_dir, offload, name, rounds=1, kv_transfer_config=connector(offload))


def check_second_engine_hits_all(first: dict, second: dict) -> None:
    (a,), (b,) = first["rounds"], second["rounds"]
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    assert all(r["cached"] == 0 for r in a)
    for n, r in zip(LENGTHS, b):
        assert r["cached"] == n // BLOCK * BLOCK, (n, r)
    # Every block was read from the shared tier by the second engine, none from its own DRAM.
    assert second["kvferry"].get("vllm:kvferry_tier_hits{medium=REMOTE}") == FULL_BLOCKS, second["kvferry"]
    assert second["kvferry"].get("vllm:kvferry_tier_hits{medium=CPU}", 0) == 0, second["kvferry"]
    assert second["cached_by_source"].get("external_unspecified", 0) > 0, second["cached_by_source"]
    # Uploads are announced to routers as stored blocks in STORAGE, REMOTE (the last ones may end
    # after the last step's events).
    shared = [e for e in first["events"] if e["type"] == "BlockStored" and e["locality"] == "REMOTE"]
    assert shared and {e["medium"] for e in shared} == {"STORAGE"}, first["events"]


def test_a_second_engine_hits_every_block_the_first_stored_in_s3(tmp_path, model_dir, monkeypatch):
    with garage(tmp_path, monkeypatch) as (env, _):
        offload = remote_offload({"url": f"s3://{env['KVFERRY_S3_BUCKET']}/kv"})
        first = run_engine(tmp_path, model_dir, offload, "s3-first")
        second = run_engine(tmp_path, model_dir, offload, "s3-second")
    check_second_engine_hits_all(first, second)


def test_a_shared_directory_serves_a_second_engine_and_flipped_bytes_are_recomputed(tmp_path, model_dir):
    shared = tmp_path / "shared"
    offload = remote_offload({"path": str(shared)})
    first = run_engine(tmp_path, model_dir, offload, "dir-first")
    second = run_engine(tmp_path, model_dir, offload, "dir-second")
    check_second_engine_hits_all(first, second)
    # No partial object is ever left where a reader could find it: only whole blocks, no temporaries.
    objects = [p for p in shared.rglob("*") if p.is_file()]
    assert len(objects) == FULL_BLOCKS and all("#" not in p.name for p in objects), objects
    for path in objects:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    third = run_engine(tmp_path, model_dir, offload, "dir-corrupt")
    (expected,), (got,) = first["rounds"], third["rounds"]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in expected]
    counters = third["kvferry"]
    assert counters.get("vllm:kvferry_remote{event=corrupt}", 0) > 0, counters
    assert counters.get("vllm:kvferry_load_failures", 0) > 0, counters
    assert counters.get("vllm:kvferry_tier_hits{medium=REMOTE}", 0) == 0, counters


def test_the_s3_server_killed_mid_run_leaves_every_request_served(tmp_path, model_dir, monkeypatch):
    with garage(tmp_path, monkeypatch) as (env, where):
        offload = remote_offload({"url": f"s3://{env['KVFERRY_S3_BUCKET']}/kv", "retry_after": 600.0})
        server = vllm_server("s3-killed", model_dir, tmp_path, connector(offload))
        try:
            server.wait_ready("/health", time.monotonic() + 600)
            expected = []
            for p in PROMPTS[:2]:
                status, body = complete(server.url, p, 8)
                assert status == 200, body
                expected.append(body["choices"][0]["token_ids"])
            subprocess.run(["bash", str(GARAGE), "stop", str(where)], timeout=60, check=True)
            # Prompts the remote was never asked about, then the first ones again: every lookup
            # and upload meets a dead server, and each request is still answered, in time.
            started = time.monotonic()
            for p in PROMPTS[2:] + PROMPTS[:2]:
                status, body = complete(server.url, p, 8, timeout=60)
                assert status == 200, body
            assert [complete(server.url, p, 8)[1]["choices"][0]["token_ids"] for p in PROMPTS[:2]] == expected
            assert time.monotonic() - started < 120
            m = metrics(server)
            assert m.get("vllm:kvferry_remote_total{event=errors}", 0) > 0, m
        finally:
            server.kill()

