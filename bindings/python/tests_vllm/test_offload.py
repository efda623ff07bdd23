"""Offload: blocks stored to the tiers as computed, found again by vLLM's block hashes after vLLM's
own prefix cache is reset, loaded back, and the output tokens unchanged."""

import json
import signal
import sys
import time

import kvferry
import numpy as np
from conftest import HERE, free_port, run
from servers import complete, metrics, vllm_server

BLOCK = 32
# Bytes of a KV block of the test model (two layers, two KV heads, float32).
BLOCK_BYTES = 64 << 10
# Several lengths, including partial last blocks and a prompt of whole blocks only.
LENGTHS = [40, 64, 100, 129]
PROMPTS = [[(i * 37 + j * 11) % 1000 + 1 for j in range(n)] for i, n in enumerate(LENGTHS)]


def offline(tmp_path, model_dir, offload: dict, name: str, prompts=PROMPTS, **options) -> dict:
    config = {
        "model": str(model_dir),
        "prompts": prompts,
        "max_tokens": 8,
        "rounds": 2,
        "events_port": free_port(),
        "kv_transfer_config": {
            "kv_connector": "KvferryConnector",
            "kv_connector_module_path": "kvferry.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"pd": False, "offload": offload},
        },
        **options,
    }
    cfg, out = tmp_path / f"{name}.json", tmp_path / f"{name}-out.json"
    cfg.write_text(json.dumps(config))
    run([sys.executable, str(HERE / "offline_run.py"), str(cfg), str(out)], tmp_path / f"{name}.log", 600)
    return json.loads(out.read_text())


def check_round_trip(result: dict, lengths=LENGTHS) -> None:
    first, second = result["rounds"]
    assert [r["tokens"] for r in second] == [r["tokens"] for r in first]
    assert all(r["cached"] == 0 for r in first)
    for n, r in zip(lengths, second, strict=True):
        # Every full block of the prompt comes back (the partial last block is recomputed).
        assert r["cached"] == n // BLOCK * BLOCK, (n, r)


def test_offload_round_trip_through_dram(tmp_path, model_dir):
    result = offline(tmp_path, model_dir, {"dram_bytes": 64 << 20}, "dram")
    check_round_trip(result)
    assert result["cached_by_source"].get("host", 0) > 0, result["cached_by_source"]
    assert result["cached_by_source"].get("disk", 0) == 0, result["cached_by_source"]
    stored = [e for e in result["events"] if e["type"] == "BlockStored" and e["medium"] != "GPU"]
    assert stored and all(e["medium"] == "CPU" for e in stored), result["events"]
    tiered = {h for e in stored for h in e["hashes"]}
    assert len(tiered) == sum(n // BLOCK for n in LENGTHS)
    # The same blocks under the same hashes as vLLM's own events, so a router matches them.
    in_gpu = {h for e in result["events"] if e["type"] == "BlockStored" and e["medium"] == "GPU" for h in e["hashes"]}
    assert tiered <= in_gpu


def test_offload_round_trip_of_a_model_with_a_sliding_window_group(tmp_path, windowed_model):
    # Prompts within the 48-token window and well past it, so that loads find blocks the window
    # gave back (vLLM's null block in their place) as well as blocks it keeps.
    lengths = [40, 100, 129, 300]
    prompts = [[(i * 31 + j * 13) % 1000 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    result = offline(tmp_path, windowed_model, {"dram_bytes": 64 << 20}, "windowed", prompts=prompts)
    log = (tmp_path / "windowed.log").read_text()
    assert "registered 4 layers in 2 groups (1 with a sliding window)" in log, log[-4000:]
    # Identical tokens from loaded blocks: both groups' bytes came back where each group reads them
    # (a sliding window layer fed another block's keys would change the greedy choice).
    check_round_trip(result, lengths)
    blocks = sum(n // BLOCK for n in lengths)
    assert result["kvferry"].get("vllm:kvferry_tier_hits{medium=CPU}") == blocks, result["kvferry"]


def test_offload_round_trip_through_disk(tmp_path, model_dir):
    # DRAM for 6 of the 10 blocks (64 KiB each), so the oldest move to disk; one prompt at a time,
    # as a put needs DRAM for all its blocks at once.
    offload = {"dram_bytes": 6 * (64 << 10), "disk_dir": str(tmp_path / "kv"), "disk_bytes": 64 << 20}
    # Blocks some other engine left, with no record of which engine that was: they must not be
    # served under this one's hashes, and are emptied at start.
    foreign = kvferry.prefix_keys(range(2 * BLOCK), BLOCK)
    source = np.zeros(3 * BLOCK_BYTES, np.uint8)
    base = -source.ctypes.data % 4096
    with kvferry.TierStore(BLOCK_BYTES, 2 * BLOCK_BYTES, disk_dir=tmp_path / "kv" / "rank0", disk_capacity=64 << 20) as store:
        regions = [(k, [(source.ctypes.data + base + i * BLOCK_BYTES, BLOCK_BYTES)]) for i, k in enumerate(foreign)]
        store.put(regions, to_disk=True).wait(30)
    result = offline(tmp_path, model_dir, offload, "disk", one_at_a_time=True)
    check_round_trip(result)
    with kvferry.TierStore(BLOCK_BYTES, BLOCK_BYTES, disk_dir=tmp_path / "kv" / "rank0", disk_capacity=64 << 20) as store:
        kept = store.disk_keys()
    assert kept and not set(foreign) & set(kept)
    assert result["cached_by_source"].get("disk", 0) > 0, result["cached_by_source"]
    media = {e["medium"] for e in result["events"] if e["type"] == "BlockStored"}
    assert {"CPU", "STORAGE"} <= media, result["events"]


# Prompts that push the others' blocks out of a 6-block DRAM onto the disk: 9 full blocks.
FILLER = [[(i * 41 + j * 17) % 1000 + 1 for j in range(96)] for i in range(3)]


def test_an_engine_killed_with_sigkill_restarts_on_its_disk_and_serves_it(tmp_path, model_dir):
    offload = {"dram_bytes": 6 * (64 << 10), "disk_dir": str(tmp_path / "kv"), "disk_bytes": 64 << 20}
    config = {
        "kv_connector": "KvferryConnector",
        "kv_connector_module_path": "kvferry.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"pd": False, "offload": offload},
    }

    def run_prompts(server, prompts):
        # One at a time: a put needs DRAM for all its blocks at once.
        out = []
        for p in prompts:
            status, body = complete(server.url, p, 8)
            assert status == 200, body
            out.append(body["choices"][0]["token_ids"])
        return out

    first = vllm_server("before-kill", model_dir, tmp_path, config)
    try:
        first.wait_ready("/health", time.monotonic() + 600)
        expected = run_prompts(first, PROMPTS)
        run_prompts(first, FILLER)
        # The filler's last stores (and the write-downs they cause) end on the store's threads
        # after the responses; then the kill: nothing is closed, flushed or unlocked.
        time.sleep(3)
    finally:
        first.kill(signal.SIGKILL)

    # The same directory: the dead engine's flock is gone with its processes, and its index log
    # is replayed; a DiskLocked here would fail the start.
    second = vllm_server("after-kill", model_dir, tmp_path, config)
    try:
        second.wait_ready("/health", time.monotonic() + 600)
        assert run_prompts(second, PROMPTS) == expected
        m = metrics(second)
        blocks = sum(n // BLOCK for n in LENGTHS)
        # Every full block of every prompt came back from disk, none from this engine's DRAM.
        assert m.get("vllm:kvferry_tier_hits_total{medium=DISK}") == blocks, m
        assert m.get("vllm:kvferry_tier_hits_total{medium=CPU}", 0) == 0, m
        assert m.get("vllm:prompt_tokens_cached_by_source_total{source=disk}", 0) > 0, m
        assert "kvferry: rank 0 found 13 blocks" in second.log.read_text()
    finally:
        second.kill()

    # Asked to, an engine empties the directory at start: the same prompts are computed again.
    cleared = {**config, "kv_connector_extra_config": {"pd": False, "offload": {**offload, "clear_on_start": True}}}
    third = vllm_server("cleared", model_dir, tmp_path, cleared)
    try:
        third.wait_ready("/health", time.monotonic() + 600)
        assert run_prompts(third, PROMPTS) == expected
        m = metrics(third)
        assert m.get("vllm:kvferry_tier_hits_total{medium=DISK}", 0) == 0, m
        assert m.get("vllm:prompt_tokens_cached_by_source_total{source=disk}", 0) == 0, m
        assert "kvferry: rank 0 found 0 blocks" in third.log.read_text()
    finally:
        third.kill()
