"""Agents in two processes, over TCP and over shared memory; a killed peer fails fast."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kvferry
from peer_main import BLOCK, BLOCKS, pattern

HERE = Path(__file__).parent


@pytest.fixture
def peer_process():
    started = []

    def start(transport: str):
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "peer_main.py"), transport],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        line = proc.stdout.readline()
        assert line, f"the peer process exited with {proc.wait()}"
        return proc, json.loads(line)

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def connect(agent, info):
    assert agent.connect_peer(info["side"], timeout=10) == "peer"
    blocks = [(info["addr"] + i * BLOCK, BLOCK) for i in range(BLOCKS)]
    return agent.prepare_remote("peer", blocks)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_blocks_move_both_ways_between_processes_byte_exact(peer_process, transport):
    proc, info = peer_process(transport)
    memory = pattern(BLOCK * BLOCKS, 11)
    theirs = pattern(BLOCK * BLOCKS, 10)
    with kvferry.Agent("main", shm=transport == "shm") as agent:
        reg = agent.register(memory)
        remote = connect(agent, info)
        local = agent.prepare_local([(reg.addr + i * BLOCK, BLOCK) for i in range(BLOCKS)])
        half = list(range(BLOCKS // 2))
        read = agent.read(local, half, remote, half, timeout=10)
        read.wait()
        assert read.transport == transport
        assert np.array_equal(memory[: BLOCK * BLOCKS // 2], theirs[: BLOCK * BLOCKS // 2])
        other = list(range(BLOCKS // 2, BLOCKS))
        agent.write(local, other, remote, other, notification=b"check", timeout=10).wait()
        assert agent.wait_notifications(10) == [("peer", b"ok")]
        agent.notify("peer", b"quit").wait(10)
        assert proc.wait(10) == 0


def test_a_killed_peer_fails_the_transfer_fast(peer_process):
    proc, info = peer_process("tcp")
    memory = np.zeros(BLOCK * BLOCKS, np.uint8)
    with kvferry.Agent("main", shm=False) as agent:
        reg = agent.register(memory)
        remote = connect(agent, info)
        local = agent.prepare_local([(reg.addr + i * BLOCK, BLOCK) for i in range(BLOCKS)])
        agent.read(local, [0], remote, [0]).wait()
        proc.kill()
        proc.wait()
        started = time.monotonic()
        with pytest.raises(kvferry.TransferError) as e:
            agent.read(local, [1], remote, [1], timeout=30).wait()
        assert time.monotonic() - started < 10, "a dead peer must fail well before the deadline"
        assert e.value.code_name in ("PeerUnreachable", "PeerDisconnected")
        assert 500 <= e.value.code < 600
        # The agent moves on: notifications to the dead peer fail too, and nothing hangs.
        with pytest.raises(kvferry.TransferError):
            agent.notify("peer", b"anyone?", timeout=5).wait()
