"""P/D across two hosts on one machine: the prefill engine in this machine's network namespace, the
decode engine in a second one, joined by a veth pair shaped with tc (a token bucket, 2 Gbit/s each
way; kernels without netem add no delay), so the KV blocks cross a link between two network stacks
over kvferry's TCP transport. iperf3 measures the link in the same run, and the test prints the
transfer's bandwidth next to it. Needs root for `ip netns`: skips, saying why, where a namespace
cannot be made."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import HERE, free_port, run
from servers import BLOCK_TOKENS, complete, metrics, vllm_server

RATE = "2gbit"
RATE_BYTES = 2e9 / 8
PREFILL_IP, DECODE_IP = "10.83.0.1", "10.83.0.2"
# Long prompts of the wide model: 31 blocks of 512 KiB each, about 60 ms at the link's rate.
PROMPTS = [[(i * 61 + j * 19) % 1000 + 1 for j in range(990)] for i in range(3)]
MAX_TOKENS = 8


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def link():
    """The namespace at the far end of the shaped veth pair: (its name, whether tc shaped it)."""
    if os.geteuid() != 0:
        pytest.skip("two hosts on one machine need root (ip netns)")
    if shutil.which("ip") is None:
        pytest.skip("two hosts on one machine need the ip command")
    # A run killed before its clean-up left its namespace, and with it an address of this subnet
    # here: removed, so that the link below is the only route to it.
    for name in _ip("netns", "list").stdout.split():
        pid = name.removeprefix("kvf-pd-")
        if pid != name and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _ip("netns", "del", name)
    tag = str(os.getpid() % 100_000)
    ns, here, there = f"kvf-pd-{os.getpid()}", f"kvpa{tag}", f"kvpb{tag}"
    made = _ip("netns", "add", ns)
    if made.returncode != 0:
        pytest.skip(f"ip netns add failed: {made.stderr.strip()}")
    try:
        steps = [
            ["link", "add", here, "type", "veth", "peer", "name", there],
            ["link", "set", there, "netns", ns],
            ["addr", "add", f"{PREFILL_IP}/24", "dev", here],
            ["-n", ns, "addr", "add", f"{DECODE_IP}/24", "dev", there],
            ["-n", ns, "link", "set", "lo", "up"],
            ["link", "set", here, "up"],
            ["-n", ns, "link", "set", there, "up"],
        ]
        for step in steps:
            out = _ip(*step)
            assert out.returncode == 0, f"ip {' '.join(step)}: {out.stderr}"
        shaped = True
        for prefix, dev in (([], here), (["-n", ns], there)):
            tbf = ["qdisc", "add", "dev", dev, "root", "tbf", "rate", RATE, "burst", "1mb", "latency", "20ms"]
            out = subprocess.run(["tc", *prefix, *tbf], capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                print(f"the link is not shaped (tc: {out.stderr.strip()}); it runs at the veth's speed")
                shaped = False
        yield ns, shaped
    finally:
        # Removing the namespace removes its end of the veth pair, and with it this one.
        _ip("netns", "del", ns)


def iperf(ns: str) -> float | None:
    """Bytes a second iperf3 moves from this namespace to `ns`, the way P/D blocks go; None
    (said) without iperf3."""
    if shutil.which("iperf3") is None:
        print("iperf3 is not installed: the link is not measured")
        return None
    port = str(free_port())
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, "iperf3", "-s", "-1", "-B", DECODE_IP, "-p", port],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Until it listens (a probing connect would take its one client).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ss = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltnH", f"sport = :{port}"], capture_output=True)
            if ss.stdout.strip():
                break
            time.sleep(0.1)
        out = subprocess.run(
            ["iperf3", "-c", DECODE_IP, "-p", port, "-t", "3", "-J"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 8
    finally:
        server.kill()
        server.wait(timeout=30)


def connector(role: str, host: str) -> dict:
    return {
        "kv_connector": "KvferryConnector",
        "kv_connector_module_path": "kvferry.vllm",
        "kv_role": role,
        # Shared memory would reach across network namespaces: every byte goes over the link instead.
        "kv_connector_extra_config": {"host": host, "shm": False, "lease_seconds": 60, "timeout_seconds": 20},
    }


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide-llama")
    run([sys.executable, str(HERE / "make_model.py"), str(path), "--wide"], tmp_path_factory.mktemp("log") / "m.log", 300)
    return path


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, link, wide_model):
    ns, shaped = link
    logs = tmp_path_factory.mktemp("two-hosts-logs")
    prefill = vllm_server("prefill", wide_model, logs, connector("kv_producer", PREFILL_IP), host=PREFILL_IP)
    decode = vllm_server("decode", wide_model, logs, connector("kv_consumer", DECODE_IP), netns=ns, host=DECODE_IP)
    servers = [prefill, decode]
    try:
        deadline = time.monotonic() + 600
        for s in servers:
            s.wait_ready("/health", deadline)
        expected = [complete(prefill.url, p, MAX_TOKENS)[1]["choices"][0]["token_ids"] for p in PROMPTS]
        yield {
            "model": wide_model,
            "shaped": shaped,
            "iperf": iperf(ns),
            "prefill": prefill,
            "decode": decode,
            "expected": expected,
        }
    finally:
        for s in servers:
            s.kill()


def test_pd_between_two_network_namespaces_over_tcp(hosts, capsys):
    prefill, decode, transport = hosts["prefill"], hosts["decode"], "tcp"
    kept = ("transport",)
    before = metrics(decode, kept)
    got = []
    for prompt in PROMPTS:
        status, body = complete(prefill.url, prompt, 1, kv_transfer_params={"do_remote_decode": True})
        assert status == 200, body
        assert body["kv_transfer_params"]["remote_host"] == PREFILL_IP
        status, body = complete(decode.url, prompt, MAX_TOKENS, kv_transfer_params=body["kv_transfer_params"])
        assert status == 200, body
        got.append(body["choices"][0]["token_ids"])
    after = metrics(decode, kept)
    assert got == hosts["expected"]
    delta = {k: after[k] - before.get(k, 0) for k in after if k.startswith("vllm:kvferry_transfer")}
    model = json.loads((hosts["model"] / "config.json").read_text())
    block_bytes = 2 * model["num_hidden_layers"] * BLOCK_TOKENS * model["num_key_value_heads"] * model["head_dim"] * 4
    blocks = sum(-(-len(p) // BLOCK_TOKENS) for p in PROMPTS)
    moved = {k: v for k, v in delta.items() if k.startswith("vllm:kvferry_transfer_bytes_total") and v}
    # Every block went over this transport (and so over the link), and nothing else did.
    assert moved == {f"vllm:kvferry_transfer_bytes_total{{transport={transport}}}": blocks * block_bytes}
    seconds = delta[f"vllm:kvferry_transfer_seconds_total{{transport={transport}}}"]
    rate = blocks * block_bytes / seconds
    link_rate = hosts["iperf"]
    figures = (
        f"\nlink: tbf {RATE} each way{'' if hosts['shaped'] else ' (not shaped)'}; iperf3 across it: "
        + ("not measured" if link_rate is None else f"{link_rate / 1e6:.0f} MB/s")
        + f"\nP/D over {transport}: {blocks * block_bytes / 1e6:.1f} MB in {len(PROMPTS)} pulls, "
        + f"{seconds * 1e3:.0f} ms from post to end: {rate / 1e6:.0f} MB/s"
        + ("" if link_rate is None else f", {100 * rate / link_rate:.0f}% of iperf3")
    )
    # Into the run's output, passed or not: the figures are what this test is for, besides its checks.
    with capsys.disabled():
        print(figures)
    if hosts["shaped"]:
        # Bytes that crossed the shaped link cannot have moved much faster than its rate (its 1 MB
        # burst aside).
        assert rate < 1.25 * RATE_BYTES, f"{rate / 1e6:.0f} MB/s over a {RATE} link"

