"""P/D disaggregation on real vLLM: a prefill server, decode servers and the example proxy, each in
its own process; then the prefill server is killed under a decode request."""

import http.client
import json
import os
import signal
import socket
import time

import pytest
from servers import BLOCK_TOKENS, complete, metrics, proxy, vllm_server

LEASE = 8.0
PROMPTS = [[(i * 53 + j * 7) % 1000 + 1 for j in range(n)] for i, n in enumerate([45, 96, 150])]
# Prompts only the failure test sends, so no engine has them cached.
FAILURE_PROMPTS = [[(i * 29 + j * 13) % 1000 + 1 for j in range(n)] for i, n in enumerate([70, 110])]
MAX_TOKENS = 12


def connector(role: str, **extra) -> dict:
    return {
        "kv_connector": "KvferryConnector",
        "kv_connector_module_path": "kvferry.vllm",
        "kv_role": role,
        "kv_connector_extra_config": {"lease_seconds": LEASE, "timeout_seconds": 20, **extra},
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_dir):
    logs = tmp_path_factory.mktemp("pd-logs")
    prefill = vllm_server("prefill", model_dir, logs, connector("kv_producer"))
    recompute = vllm_server("decode-recompute", model_dir, logs, {**connector("kv_consumer"), "kv_load_failure_policy": "recompute"})
    # Over TCP, so that a frozen prefill engine leaves its pulls waiting (shared memory would read it).
    fail = vllm_server(
        "decode-fail", model_dir, logs, {**connector("kv_consumer", shm=False), "kv_load_failure_policy": "fail"}
    )
    servers = [prefill, recompute, fail]
    try:
        deadline = time.monotonic() + 600
        for s in servers:
            s.wait_ready("/health", deadline)
        router = proxy(prefill, recompute, logs)
        servers.append(router)
        router.wait_ready("/health", deadline)
        yield {"prefill": prefill, "recompute": recompute, "fail": fail, "proxy": router}
    finally:
        for s in servers:
            s.kill()


def tokens(status_body: tuple[int, dict]) -> list[int]:
    status, body = status_body
    assert status == 200, body
    return body["choices"][0]["token_ids"]


def usage(server) -> float:
    return metrics(server)["vllm:kv_cache_usage_perc"]


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return condition()


def test_decode_through_proxy_equals_one_engine(cluster, model_dir):
    prefill, decode, router = cluster["prefill"], cluster["recompute"], cluster["proxy"]
    # The single-engine reference: the prefill server generating on its own.
    expected = [tokens(complete(prefill.url, p, MAX_TOKENS)) for p in PROMPTS]
    before = metrics(decode)
    got = [tokens(complete(router.url, p, MAX_TOKENS)) for p in PROMPTS]
    after = metrics(decode)
    assert got == expected
    # By vLLM's own counters the decode engine computed no prompt token: all came from the prefill
    # engine (vLLM counts the last prompt token, run again to sample from, as transferred too).
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["vllm:prompt_tokens_by_source_total{source=local_compute}"] == 0
    assert delta["vllm:prompt_tokens_by_source_total{source=local_cache_hit}"] == 0
    assert delta["vllm:prompt_tokens_by_source_total{source=external_kv_transfer}"] == sum(map(len, PROMPTS))
    assert delta["vllm:prompt_tokens_cached_by_source_total{source=p2p}"] == sum(map(len, PROMPTS))
    # kvferry's counters reach vLLM's /metrics: the decode engine read every block of the prompts,
    # whole (K and V of every layer, float32), and nothing else.
    model = json.loads((model_dir / "config.json").read_text())
    block_bytes = 2 * model["num_hidden_layers"] * BLOCK_TOKENS * model["num_key_value_heads"] * model["head_dim"] * 4
    blocks = sum(-(-len(p) // BLOCK_TOKENS) for p in PROMPTS)
    assert delta["vllm:kvferry_transfer_bytes_total"] == blocks * block_bytes
    # Counters appear once they count something.
    assert delta.get("vllm:kvferry_transfer_failures_total", 0) == 0
    assert delta.get("vllm:kvferry_load_failures_total", 0) == 0
    # The decode side's notification freed the prefill blocks, well before their lease ends.
    assert wait_for(lambda: usage(prefill) == 0.0, LEASE / 2)
    assert usage(decode) == 0.0


def test_lease_ends_and_frees_unread_prefill_blocks(cluster):
    prefill = cluster["prefill"]
    status, body = complete(prefill.url, PROMPTS[2][:100], 1, kv_transfer_params={"do_remote_decode": True})
    assert status == 200, body
    params = body["kv_transfer_params"]
    assert params["do_remote_prefill"] and params["remote_block_ids"][0]
    held_since = time.monotonic()
    assert usage(prefill) > 0.0
    assert wait_for(lambda: usage(prefill) == 0.0, LEASE + 10)
    assert time.monotonic() - held_since >= LEASE - 1


def test_a_decode_request_aborted_mid_pull_frees_its_blocks_at_once(cluster):
    prefill, decode = cluster["prefill"], cluster["fail"]
    prompt, warm = FAILURE_PROMPTS[0][:60], FAILURE_PROMPTS[1][:60]
    # One pull first, so the decode engine has the prefill engine's side channel and link.
    status, body = complete(prefill.url, warm, 1, kv_transfer_params={"do_remote_decode": True})
    tokens(complete(decode.url, warm, 2, kv_transfer_params=body["kv_transfer_params"]))
    status, body = complete(prefill.url, prompt, 1, kv_transfer_params={"do_remote_decode": True})
    assert status == 200, body
    os.killpg(prefill.proc.pid, signal.SIGSTOP)
    try:
        # A streaming request whose client goes away: vLLM aborts it while its pull waits on the
        # frozen prefill engine.
        request = {"model": "m", "prompt": prompt, "max_tokens": 4, "stream": True,
                   "kv_transfer_params": body["kv_transfer_params"]}  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", decode.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(request), {"Content-Type": "application/json"})
        assert wait_for(lambda: usage(decode) > 0.0, 10), "the pull never took blocks"
        time.sleep(1.0)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        aborted = time.monotonic()
        # The blocks come back once the cancelled transfer has ended, long before its 20 s deadline.
        assert wait_for(lambda: usage(decode) == 0.0, 10)
        assert time.monotonic() - aborted < 10
    finally:
        os.killpg(prefill.proc.pid, signal.SIGCONT)
    assert tokens(complete(decode.url, warm, 2))


def test_prefill_killed_before_decode_reads(cluster):
    prefill, recompute, fail = cluster["prefill"], cluster["recompute"], cluster["fail"]
    expected = [tokens(complete(prefill.url, p, MAX_TOKENS)) for p in FAILURE_PROMPTS]
    params = []
    for p in FAILURE_PROMPTS:
        status, body = complete(prefill.url, p, 1, kv_transfer_params={"do_remote_decode": True})
        assert status == 200, body
        params.append(body["kv_transfer_params"])
    prefill.kill(signal.SIGKILL)
    start = time.monotonic()
    got = [
        tokens(complete(recompute.url, p, MAX_TOKENS, timeout=60, kv_transfer_params=kp))
        for p, kp in zip(FAILURE_PROMPTS, params)
    ]
    assert got == expected
    for p, kp in zip(FAILURE_PROMPTS, params):
        status, body = complete(fail.url, p, MAX_TOKENS, timeout=60, kv_transfer_params=kp)
        failed = status != 200 or body["choices"][0].get("finish_reason") == "error"
        assert failed, body
    # Nothing waited for a transfer deadline, and no block stayed taken.
    assert time.monotonic() - start < 60
    assert wait_for(lambda: usage(recompute) == 0.0 and usage(fail) == 0.0, 10)
