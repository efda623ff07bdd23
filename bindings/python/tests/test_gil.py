"""Blocking calls release the GIL: another Python thread keeps running while one waits."""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import kvferry
from conftest import pattern
from peer_main import BLOCK, BLOCKS

HERE = Path(__file__).parent

WAIT = 1.5


def longest_stall_while(blocking_call) -> float:
    """Run `blocking_call` in a thread; return the longest gap between this thread's steps."""
    done = threading.Event()

    def run():
        try:
            blocking_call()
        finally:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    longest, last = 0.0, time.monotonic()
    while not done.is_set():
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    thread.join()
    return longest


def test_waiting_for_notifications_releases_the_gil():
    with kvferry.Agent("a") as agent:
        started = time.monotonic()
        stall = longest_stall_while(lambda: agent.wait_notifications(WAIT))
        assert time.monotonic() - started >= WAIT * 0.9
    assert stall < WAIT / 2, f"this thread stalled {stall:.3f} s while another waited"


def test_connecting_to_a_silent_peer_releases_the_gil():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    host, port = silent.getsockname()
    try:
        with kvferry.Agent("a") as agent:

            def connect():
                with pytest.raises(kvferry.KvferryError):
                    agent.connect_peer(f"{host}:{port}", timeout=WAIT)

            stall = longest_stall_while(connect)
    finally:
        silent.close()
    assert stall < WAIT / 2, f"this thread stalled {stall:.3f} s while another connected"


def test_threads_share_one_agent(pair):
    """Objects carry no thread affinity: four threads post through one agent at once."""
    a, b = pair()
    block, blocks = 4096, 32
    source, dest = pattern(block * blocks, 30), np.zeros(block * blocks, np.uint8)
    a_reg, b_reg = a.register(dest), b.register(source)
    a.add_peer(b.metadata())
    local = a.prepare_local([(a_reg.addr + i * block, block) for i in range(blocks)])
    remote = a.prepare_remote("b", [(b_reg.addr + i * block, block) for i in range(blocks)])
    failures = []

    def worker(first: int):
        try:
            mine = list(range(first, blocks, 4))
            for _ in range(25):
                a.read(local, mine, remote, mine).wait()
        except Exception as e:  # reported below, in the test's thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert np.array_equal(source, dest)


def _state(pid: int) -> str:
    """The process's state letter (`T` once stopped)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("how", ["deregister", "refcount", "collector"])
def test_a_deregistration_cuts_off_a_read_from_a_stopped_peer_and_lands_nothing(how):
    """The drop of a registration with a READ in flight from a stopped peer does not wait for the
    peer (it cuts the READ off, releasing the GIL while it does): it returns long before the READ's
    deadline, with the peer still stopped, and not a byte lands, then or after the peer resumes."""
    peer = subprocess.Popen([sys.executable, str(HERE / "peer_main.py"), "tcp"], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(peer.stdout.readline())
        memory = np.zeros(BLOCK * BLOCKS, np.uint8)
        with kvferry.Agent("main", shm=False) as agent:
            reg = agent.register(memory)
            assert agent.connect_peer(info["side"], timeout=10) == "peer"
            remote = agent.prepare_remote("peer", [(info["addr"], BLOCK * BLOCKS)])
            local = agent.prepare_local([(reg.addr, reg.length)])
            os.kill(peer.pid, signal.SIGSTOP)
            until = time.monotonic() + 30
            while _state(peer.pid) != "T":  # the stop is delivered asynchronously
                assert time.monotonic() < until, "the peer did not stop"
                time.sleep(0.01)
            transfer = agent.read(local, [0], remote, [0], timeout=60)
            started = time.monotonic()
            if how == "deregister":
                reg.deregister()
            elif how == "refcount":
                del reg
            else:
                cycle = [reg]
                cycle.append(cycle)
                del reg, cycle
                gc.collect()
            took = time.monotonic() - started
            assert took < 20, f"the drop waited {took:.1f} s for a stopped peer"
            assert _state(peer.pid) == "T", "the peer is still stopped"
            with pytest.raises(kvferry.KvferryError) as stopped:
                transfer.wait()
            assert stopped.value.code in (kvferry.ERROR_CODES["Cancelled"], kvferry.ERROR_CODES["NotRegistered"])
            os.kill(peer.pid, signal.SIGCONT)
            agent.notify("peer", b"quit").wait(10)
        assert peer.wait(10) == 0
        assert not memory.any(), "bytes landed in memory whose registration was dropped"
    finally:
        if peer.poll() is None:
            os.kill(peer.pid, signal.SIGCONT)
            peer.kill()
            peer.wait()
