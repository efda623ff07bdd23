"""Blocking calls release the GIL: another Python thread keeps running while one waits."""

import socket
import threading
import time

import pytest

import kvferry

WAIT = 1.0


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
