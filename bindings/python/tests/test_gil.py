"""Blocking calls release the GIL: another Python thread keeps running while one waits."""

import socket
import threading
import time

import numpy as np
import pytest

import kvferry
from conftest import pattern

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
