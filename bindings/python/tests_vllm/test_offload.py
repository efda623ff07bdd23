"""Offload: blocks stored to the tiers as computed, found again by vLLM's block hashes after vLLM's
own prefix cache is reset, loaded back, and the output tokens unchanged."""

import json
import sys

from conftest import HERE, free_port, run

BLOCK = 32
# Several lengths, including partial last blocks and a prompt of whole blocks only.
LENGTHS = [40, 64, 100, 129]
PROMPTS = [[(i * 37 + j * 11) % 1000 + 1 for j in range(n)] for i, n in enumerate(LENGTHS)]


def offline(tmp_path, model_dir, offload: dict, name: str) -> dict:
    config = {
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
        full_blocks = n // BLOCK
        # Every full block of the prompt comes back; a prompt of whole blocks recomputes its last
        # token so that it can sample the next one.
        expected = full_blocks * BLOCK - (1 if n % BLOCK == 0 else 0)
        assert r["cached"] == expected, (n, r)


def test_offload_round_trip_through_dram(tmp_path, model_dir):
    result = offline(tmp_path, model_dir, {"dram_bytes": 64 << 20}, "dram")
    check_round_trip(result)
    assert result["cached_by_source"].get("host", 0) > 0, result["cached_by_source"]
    assert result["cached_by_source"].get("disk", 0) == 0, result["cached_by_source"]
    stored = [e for e in result["events"] if e["type"] == "BlockStored"]
    assert stored and all(e["medium"] == "CPU" for e in stored), result["events"]
    assert len({h for e in stored for h in e["hashes"]}) == sum(n // BLOCK for n in LENGTHS)


def test_offload_round_trip_through_disk(tmp_path, model_dir):
    # DRAM for the largest prompt's blocks only (64 KiB a block): the rest moves to disk.
    offload = {"dram_bytes": 4 * (64 << 10), "disk_dir": str(tmp_path / "kv"), "disk_bytes": 64 << 20}
    result = offline(tmp_path, model_dir, offload, "disk")
    check_round_trip(result)
    assert result["cached_by_source"].get("disk", 0) > 0, result["cached_by_source"]
    media = {e["medium"] for e in result["events"] if e["type"] == "BlockStored"}
    assert {"CPU", "STORAGE"} <= media, result["events"]
