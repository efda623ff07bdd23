"""P/D with the prefill and the decode engine on one host, their workers bound to the same CPU: the
binding vLLM's CPU build picks by default for every engine on a host with a few cores."""

import os
import time
from pathlib import Path

import pytest
from servers import complete, metrics, vllm_server

LEASE = 40.0
PROMPTS = [[(i * 41 + j * 17) % 1000 + 1 for j in range(n)] for i, n in enumerate([64, 96, 120, 80])]
MAX_TOKENS = 12
# A P/D request takes well under a second here; one stalled behind the prefill's lease takes about
# the lease.
BOUND = 10.0


def connector(role: str) -> dict:
    return {
        "kv_connector": "KvferryConnector",
        "kv_connector_module_path": "kvferry.vllm",
        "kv_role": role,
        "kv_connector_extra_config": {"lease_seconds": LEASE, "timeout_seconds": 20},
    }


def worker_cpus(server) -> set[int]:
    """The CPUs the engine's worker process is bound to (its main thread, which vLLM pins)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            pgid = int((entry / "stat").read_text().rpartition(")")[2].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        if comm == "VLLM::Worker" and pgid == server.proc.pid:
            return os.sched_getaffinity(int(entry.name))
    raise AssertionError(f"no worker process under {server.name}")


@pytest.fixture(scope="module")
def engines(tmp_path_factory, model_dir):
    logs = tmp_path_factory.mktemp("colocated-logs")
    # Both engines' workers on one CPU. vLLM's "auto" binding gives every engine's worker the same
    # cores, the node's first ones after keeping the last for its other processes: on a host of
    # three cores, core 0 for all.
    cpu = str(max(os.sched_getaffinity(0)))
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpu}
    prefill = vllm_server("prefill", model_dir, logs, connector("kv_producer"), env)
    decode = vllm_server("decode", model_dir, logs, connector("kv_consumer"), env)
    try:
        deadline = time.monotonic() + 600
        for s in (prefill, decode):
            s.wait_ready("/health", deadline)
        yield prefill, decode
    finally:
        prefill.kill()
        decode.kill()


def usage(server) -> float:
    return metrics(server)["vllm:kv_cache_usage_perc"]


def test_colocated_engines_on_one_cpu_serve_pd_without_waiting_for_the_lease(engines):
    prefill, decode = engines
    # The premise: vLLM bound both workers to the same single CPU.
    assert worker_cpus(prefill) == worker_cpus(decode)
    assert len(worker_cpus(prefill)) == 1
    expected = [complete(prefill.url, p, MAX_TOKENS)[1]["choices"][0]["token_ids"] for p in PROMPTS]
    for prompt, want in zip(PROMPTS, expected):
        start = time.monotonic()
        status, body = complete(prefill.url, prompt, 1, kv_transfer_params={"do_remote_decode": True})
        assert status == 200, body
        params = body["kv_transfer_params"]
        status, body = complete(decode.url, prompt, MAX_TOKENS, timeout=LEASE + 30, kv_transfer_params=params)
        took = time.monotonic() - start
        assert status == 200, body
        assert took < BOUND, f"a P/D request took {took:.1f} s under a {LEASE:.0f} s lease"
        assert body["choices"][0]["token_ids"] == want
        # The decode engine's read released the prefill's blocks, long before the lease ends.
        deadline = time.monotonic() + BOUND
        while usage(prefill) != 0.0 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert usage(prefill) == 0.0
