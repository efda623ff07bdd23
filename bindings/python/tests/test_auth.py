"""Peers prove the cluster secret: a peer process with another secret, or none, gets no metadata."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvferry

HERE = Path(__file__).parent


def start_peer(env: dict[str, str]):
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "peer_main.py"), "tcp"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    line = proc.stdout.readline()
    assert line, f"the peer process exited with {proc.wait()}"
    return proc, json.loads(line)


@pytest.mark.parametrize(
    "peer_env",
    [{"KVFERRY_SECRET": "another cluster's secret, long enough"}, {"KVFERRY_AUTH": "none"}],
    ids=["other-secret", "no-auth"],
)
def test_a_peer_without_our_secret_is_refused(peer_env):
    proc, info = start_peer(peer_env)
    try:
        with kvferry.Agent("main", shm=False) as agent:
            with pytest.raises(kvferry.TransferError) as caught:
                agent.connect_peer(info["side"], timeout=10)
            assert caught.value.code == 505, caught.value
            assert agent.peers() == []
    finally:
        proc.kill()
        proc.wait()


def test_secrets_are_given_as_text_or_bytes_and_short_ones_are_refused():
    with kvferry.Agent("a", shm=False, secret="a shared secret of some length") as a, kvferry.Agent(
        "b", shm=False, secret=b"a shared secret of some length"
    ) as b:
        host, port = a.serve_side_channel()
        assert b.connect_peer(f"{host}:{port}", timeout=10) == "a"
    with pytest.raises(kvferry.InvalidArgumentError):
        kvferry.Agent("c", secret="short")
    with pytest.raises(ValueError):
        kvferry.Agent("d", auth="maybe")
