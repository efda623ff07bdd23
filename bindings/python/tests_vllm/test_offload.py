"""Offload: blocks stored to the tiers as computed, found again by vLLM's block hashes after vLLM's
own prefix cache is reset, loaded back, and the output tokens unchanged."""

import json
import sys

from conftest import HERE, free_port, run

BLOCK = 32
# Several lengths, including partial last blocks and a prompt of whole blocks only.
LENGTHS = [40, 64, 100, 129]
PROMPTS = [[(i * 37 + j * 11) % 1000 + 1 for j in range(n)] for i, n in enumerate(LENGTHS)]


def offline(tmp_path, model_dir, offload: dict, name: str, **options) -> dict:
    config = {
        **options,
        "model": str(model_dir),
        "prompts": PROMPTS,
        "max_tokens": 8,
        "rounds": 2,
        "events_port": free_port(),
        "kv_transfer_config": {
            "kv_connector": "KvferryConnector",
            "kv_connector_module_path": "kvferry.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"pd": False, "offload": offload},
        },
    }
    cfg, out = tmp_path / f"{name}.json", tmp_path / f"{name}-out.json"
    cfg.write_text(json.dumps(config))
    run([sys.executable, str(HERE / "offline_run.py"), str(cfg), str(out)], tmp_path / f"{name}.log", 600)
    return json.loads(out.read_text())


def check_round_trip(result: dict) -> None:
    first, second = result["rounds"]
    assert [r["tokens"] for r in second] == [r["tokens"] for r in first]
    assert all(r["cached"] == 0 for r in first)
    for n, r in zip(LENGTHS, second):
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


def test_offload_round_trip_through_disk(tmp_path, model_dir):
    # DRAM for 6 of the 10 blocks (64 KiB each), so the oldest move to disk; one prompt at a time,
    # as a put needs DRAM for all its blocks at once.
    offload = {"dram_bytes": 6 * (64 << 10), "disk_dir": str(tmp_path / "kv"), "disk_bytes": 64 << 20}
    result = offline(tmp_path, model_dir, offload, "disk", one_at_a_time=True)
    check_round_trip(result)
    assert result["cached_by_source"].get("disk", 0) > 0, result["cached_by_source"]
    media = {e["medium"] for e in result["events"] if e["type"] == "BlockStored"}
    assert {"CPU", "STORAGE"} <= media, result["events"]
