"""P/D of a model with two KV cache groups (full attention and a sliding window): every group's
blocks move, and a sliding window's only where the decode engine keeps them."""

import json
import time

import pytest
from servers import BLOCK_TOKENS, complete, metrics, vllm_server

# Within the 48-token window, and well past it.
PROMPTS = [[(i * 47 + j * 19) % 1000 + 1 for j in range(n)] for i, n in enumerate([40, 150, 300])]
MAX_TOKENS = 12


def connector(role: str) -> dict:
    return {
        "kv_connector": "KvferryConnector",
        "kv_connector_module_path": "kvferry.vllm",
        "kv_role": role,
        "kv_connector_extra_config": {"lease_seconds": 30, "timeout_seconds": 20},
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory, windowed_model):
    logs = tmp_path_factory.mktemp("groups-logs")
    prefill = vllm_server("prefill-windowed", windowed_model, logs, connector("kv_producer"))
    decode = vllm_server("decode-windowed", windowed_model, logs, connector("kv_consumer"))
    try:
        deadline = time.monotonic() + 600
        for s in (prefill, decode):
            s.wait_ready("/health", deadline)
        yield prefill, decode
    finally:
        prefill.kill()
        decode.kill()


def test_pd_moves_every_kv_cache_group(pair, windowed_model):
    prefill, decode = pair
    assert "in 2 groups (1 with a sliding window)" in decode.log.read_text()
    expected = []
    for prompt in PROMPTS:
        status, body = complete(prefill.url, prompt, MAX_TOKENS)
        assert status == 200, body
        expected.append(body["choices"][0]["token_ids"])
    before = metrics(decode)
    got = []
    for prompt in PROMPTS:
        status, body = complete(prefill.url, prompt, 1, kv_transfer_params={"do_remote_decode": True})
        assert status == 200, body
        status, body = complete(decode.url, prompt, MAX_TOKENS, kv_transfer_params=body["kv_transfer_params"])
        assert status == 200, body
        got.append(body["choices"][0]["token_ids"])
    after = metrics(decode)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert got == expected
    # The decode engine computed no prompt token: both groups' blocks came from the prefill engine.
    assert delta["vllm:prompt_tokens_by_source_total{source=local_compute}"] == 0
    assert delta["vllm:prompt_tokens_by_source_total{source=external_kv_transfer}"] == sum(map(len, PROMPTS))
    # Half the layers (full attention) read every block; the other half (the window) only the blocks
    # the window keeps, so fewer than every block of every layer, more than the full layers alone.
    model = json.loads((windowed_model / "config.json").read_text())
    layer_block = 2 * BLOCK_TOKENS * model["num_key_value_heads"] * model["head_dim"] * 4
    full_layers = model["layer_types"].count("full_attention")
    blocks = sum(-(-len(p) // BLOCK_TOKENS) for p in PROMPTS)
    moved = delta["vllm:kvferry_transfer_bytes_total"]
    assert full_layers * blocks * layer_block < moved < model["num_hidden_layers"] * blocks * layer_block, moved
    assert delta.get("vllm:kvferry_load_failures_total", 0) == 0
