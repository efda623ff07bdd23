"""A registration keeps a tensor's memory, not the tensor: a tensor whose memory moves is found and
revoked before a peer in another process can write into memory that is no longer the tensor's."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kvferry
import kvferry._memory
from conftest import pattern

HERE = Path(__file__).parent
ELEMENTS = 4096  # int32: 16 KiB


@pytest.fixture
def writer():
    """`start(agent, reg)`: a writer process aimed at `reg`; returns `write(seed) -> outcome`."""
    started = []

    def start(agent, reg):
        host, port = agent.serve_side_channel()
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "writer_main.py"), f"{host}:{port}", str(reg.addr), str(reg.length)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        line = proc.stdout.readline()
        assert line, f"the writer process exited with {proc.wait()}"
        info = json.loads(line)

        def write(seed: int) -> str:
            proc.stdin.write(f"write {seed}\n")
            proc.stdin.flush()
            outcome = proc.stdout.readline().strip()
            assert outcome, f"the writer process exited with {proc.wait()}"
            return outcome

        return write, info

    yield start
    for proc in started:
        proc.stdin.close()
        proc.wait(10)


def as_bytes(tensor) -> np.ndarray:
    # Through a copy: `numpy()` would make the tensor's own storage unresizable for good.
    return tensor.clone().view(-1).numpy().view(np.uint8)


@pytest.fixture
def check_every():
    """`check_every(seconds)`: the periodic check's interval for this test."""
    watcher = kvferry._memory.WATCHER
    before = watcher.interval
    yield watcher.set_interval
    watcher.set_interval(before)


@pytest.fixture
def quiet_watcher(check_every):
    """No periodic check during the test: what raises is the call the test makes."""
    check_every(0)


def assert_revoked(excinfo):
    assert isinstance(excinfo.value, kvferry.DescriptorError)
    assert excinfo.value.code_name == "NotRegistered"
    assert "revoked" in str(excinfo.value)


def test_a_tensor_given_other_storage_is_revoked_and_new_tensors_stay_untouched(torch, writer, quiet_watcher):
    with kvferry.Agent("main", shm=False) as agent:
        t = torch.zeros(ELEMENTS, dtype=torch.int32)
        reg = agent.register(t)
        write, info = writer(agent, reg)
        local = agent.prepare_local([(reg.addr, reg.length)])
        remote = agent.prepare_remote("writer", [(info["addr"], info["len"])])
        assert write(1) == "ok"
        assert np.array_equal(as_bytes(t), pattern(reg.length, 1))

        t.set_(torch.empty(0, dtype=torch.int32))
        # Allocated while the old storage is still registered: it must not get its memory.
        fresh = [torch.zeros(ELEMENTS, dtype=torch.int32) for _ in range(8)]
        write(2)  # lands in the old storage (kept by the registration) or is refused
        for tensor in fresh:
            assert not as_bytes(tensor).any(), "a remote WRITE reached a tensor allocated after set_"

        with pytest.raises(kvferry.KvferryError) as e:
            agent.write(local, [0], remote, [0], timeout=10)
        assert_revoked(e)
        assert "set_" in str(e.value)
        with pytest.raises(kvferry.KvferryError) as e:
            reg.check()
        assert_revoked(e)
        # Revoked on every transport: the peer's key no longer opens the memory.
        assert write(3) == "RemoteUnknownKey"
        for tensor in fresh:
            assert not as_bytes(tensor).any()
        reg.deregister()  # after a revocation: harmless


def test_a_registered_storage_cannot_be_resized_and_keeps_taking_writes(torch, writer):
    with kvferry.Agent("main", shm=False) as agent:
        t = torch.zeros(ELEMENTS, dtype=torch.int32)
        reg = agent.register(t)
        write, _ = writer(agent, reg)
        with pytest.raises(RuntimeError, match="not resizable"):
            t.untyped_storage().resize_(0)
        assert t.untyped_storage().nbytes() == reg.length and t.data_ptr() == reg.addr
        reg.check()
        assert write(4) == "ok"
        assert np.array_equal(as_bytes(t), pattern(reg.length, 4))
        # Deregistered, the storage is the tensor's own again: resizable, bytes unchanged.
        reg.deregister()
        assert np.array_equal(as_bytes(t), pattern(reg.length, 4))
        t.untyped_storage().resize_(0)
        assert t.untyped_storage().nbytes() == 0


def test_a_storage_resized_where_it_cannot_be_pinned_is_revoked(torch, writer, monkeypatch, quiet_watcher):
    monkeypatch.setattr(kvferry._memory, "_can_pin", lambda torch: False)
    with kvferry.Agent("main", shm=False) as agent:
        t = torch.zeros(ELEMENTS, dtype=torch.int32)
        reg = agent.register(t)
        write, _ = writer(agent, reg)
        assert write(5) == "ok"
        t.untyped_storage().resize_(0)
        with pytest.raises(kvferry.KvferryError) as e:
            agent.metadata()
        assert_revoked(e)
        assert "shrank" in str(e.value)
        agent.metadata()  # reported once: the agent's other calls go on
        with pytest.raises(kvferry.KvferryError) as e:
            agent.prepare_local([(reg.addr, reg.length)])
        assert e.value.code_name == "NotRegistered"
        assert write(6) == "RemoteUnknownKey"


def test_a_storage_moved_to_shared_memory_is_revoked_and_its_old_memory_kept(torch, writer, quiet_watcher):
    with kvferry.Agent("main", shm=False) as agent:
        t = torch.zeros(ELEMENTS, dtype=torch.int32)
        reg = agent.register(t)
        write, _ = writer(agent, reg)
        t.share_memory_()  # copies into a shared mapping: the tensor's memory moves
        assert t.data_ptr() != reg.addr
        write(7)  # into the old memory, still held by the registration, or refused
        assert not as_bytes(t).any(), "a remote WRITE reached the tensor's new memory"
        with pytest.raises(kvferry.KvferryError) as e:
            agent.check()
        assert_revoked(e)
        assert write(8) == "RemoteUnknownKey"
        assert not as_bytes(t).any()


def test_the_periodic_check_revokes_without_any_call(torch, writer, check_every):
    check_every(0.01)
    with kvferry.Agent("main", shm=False) as agent:
        t = torch.zeros(ELEMENTS, dtype=torch.int32)
        reg = agent.register(t)
        write, _ = writer(agent, reg)
        t.set_(torch.empty(0, dtype=torch.int32))
        give_up = time.monotonic() + 30
        while "revoked" not in repr(reg) and time.monotonic() < give_up:
            assert write(9) in ("ok", "RemoteUnknownKey")
        assert "revoked" in repr(reg)
        assert write(10) == "RemoteUnknownKey"


def test_buffers_cannot_be_resized_while_registered():
    array, buffer = np.zeros(4096, np.uint8), bytearray(4096)
    with kvferry.Agent("main", shm=False) as agent:
        array_reg, buffer_reg = agent.register(array), agent.register(buffer)
        with pytest.raises(ValueError, match="referenced"):
            array.resize(1 << 20)
        with pytest.raises(BufferError):
            buffer.extend(bytes(1 << 20))
        assert array.ctypes.data == array_reg.addr
        array_reg.deregister()
        buffer_reg.deregister()
    array.resize(1 << 20)
    buffer.extend(bytes(1 << 20))
