import os

import numpy as np
import pytest

import kvferry

# Agents prove a cluster secret to each other; the peer processes these tests start inherit it.
os.environ.setdefault("KVFERRY_SECRET", "the Python tests' cluster secret")


@pytest.fixture
def torch():
    """torch, or a skip saying why; KVFERRY_REQUIRE_TORCH=1 turns the skip into a failure."""
    try:
        import torch
    except ImportError as e:
        if os.environ.get("KVFERRY_REQUIRE_TORCH") == "1":
            pytest.fail(f"KVFERRY_REQUIRE_TORCH=1 but torch does not import: {e}")
        pytest.skip(f"torch is not installed here ({e}); the torch tests run where it is")
    return torch


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """Bytes that differ from block to block and from seed to seed."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


@pytest.fixture
def pair():
    """Two agents in this process that know each other, over the transports of `request.param`."""
    made = []

    def make(*, shm: bool = True):
        a = kvferry.Agent("a", shm=shm)
        b = kvferry.Agent("b", shm=shm)
        made.extend([a, b])
        assert a.add_peer(b.metadata()) == "b"
        assert b.add_peer(a.metadata()) == "a"
        return a, b

    yield make
    for agent in made:
        agent.close()


def link_whole(a, b, a_mem, b_mem):
    """Register a_mem on a and b_mem on b; return the registrations and a's lists of each, whole."""
    a_reg, b_reg = a.register(a_mem), b.register(b_mem)
    a.add_peer(b.metadata())  # b's metadata now holds its registration
    local = a.prepare_local([(a_reg.addr, a_reg.length)])
    remote = a.prepare_remote(b.name, [(b_reg.addr, b_reg.length)])
    return a_reg, b_reg, local, remote
