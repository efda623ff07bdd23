"""Two agents in one process move numpy and torch memory both ways, byte-exact."""

import numpy as np
import pytest

import kvferry
from conftest import link_whole, pattern

BLOCK = 4096
BLOCKS = 8


def blocks(reg: kvferry.Registration):
    return [(reg.addr + i * BLOCK, BLOCK) for i in range(BLOCKS)]


def exchange(a, b, a_mem, b_mem, transport):
    """READ and WRITE between a_mem (on a) and b_mem (on b), each with a notification."""
    a_reg, b_reg = a.register(a_mem), b.register(b_mem)
    # b publishes its registration to a through fresh metadata.
    a.add_peer(b.metadata())
    local = a.prepare_local(blocks(a_reg))
    remote = a.prepare_remote("b", blocks(b_reg))
    assert len(local) == len(remote) == BLOCKS and remote.peer == "b" and local.peer is None

    as_bytes = lambda mem: bytes(memoryview(mem).cast("B")) if isinstance(mem, np.ndarray) else mem.numpy().tobytes()
    b_before = as_bytes(b_mem)

    # READ blocks of b into a, in a shuffled order.
    order = [3, 0, 7, 5]
    read = a.read(local, order, remote, order, notification=b"read-done", timeout=10)
    read.wait(timeout=10)
    assert read.poll() and read.bytes == len(order) * BLOCK and read.transport == transport
    a_now = as_bytes(a_mem)
    for i in order:
        assert a_now[i * BLOCK : (i + 1) * BLOCK] == b_before[i * BLOCK : (i + 1) * BLOCK]
    assert b.wait_notifications(5) == [("a", b"read-done")]

    # WRITE blocks of a onto other blocks of b.
    write = a.write(local, [1, 2], remote, [6, 4], notification=b"write-done")
    write.wait()
    b_now = as_bytes(b_mem)
    assert b_now[6 * BLOCK : 7 * BLOCK] == a_now[1 * BLOCK : 2 * BLOCK]
    assert b_now[4 * BLOCK : 5 * BLOCK] == a_now[2 * BLOCK : 3 * BLOCK]
    # Blocks nobody wrote are untouched.
    assert b_now[0:BLOCK] == b_before[0:BLOCK]
    assert b.wait_notifications(5) == [("a", b"write-done")]
    a_reg.deregister()
    b_reg.deregister()


@pytest.mark.parametrize("shm,transport", [(False, "tcp"), (True, "shm")])
def test_numpy_blocks_move_both_ways_byte_exact(pair, shm, transport):
    a, b = pair(shm=shm)
    a_mem = pattern(BLOCK * BLOCKS, 1).reshape(BLOCKS, BLOCK // 4, 4)
    b_mem = pattern(BLOCK * BLOCKS, 2).view(np.float32)
    exchange(a, b, a_mem, b_mem, transport)


@pytest.mark.parametrize("shm,transport", [(False, "tcp"), (True, "shm")])
def test_torch_tensors_move_both_ways_byte_exact(pair, torch, shm, transport):
    a, b = pair(shm=shm)
    a_mem = torch.from_numpy(pattern(BLOCK * BLOCKS, 3)).view(torch.float16).reshape(BLOCKS, -1)
    b_mem = torch.from_numpy(pattern(BLOCK * BLOCKS, 4))
    reg = a.register(a_mem)
    assert (reg.addr, reg.length, reg.device) == (a_mem.data_ptr(), BLOCK * BLOCKS, "cpu")
    reg.deregister()
    exchange(a, b, a_mem, b_mem, transport)


def test_a_notification_alone_reaches_the_peer(pair):
    a, b = pair()
    a.notify("b", b"hello").wait(5)
    b.notify("a", b"").wait(5)
    assert b.wait_notifications(5) == [("a", b"hello")]
    assert a.wait_notifications(5) == [("b", b"")]
    assert a.take_notifications() == []


def test_raw_pointers_register_and_move(pair):
    a, b = pair(shm=False)
    src, dst = pattern(BLOCK, 5), np.zeros(BLOCK, np.uint8)
    a_reg = a.register_ptr(dst.ctypes.data, BLOCK)
    b_reg = b.register_ptr(src.ctypes.data, BLOCK, "cpu")
    assert a_reg.device == "cpu" and "Registration" in repr(a_reg)
    a.add_peer(b.metadata())
    local = a.prepare_local([(a_reg.addr, BLOCK)])
    remote = a.prepare_remote("b", [(b_reg.addr, BLOCK)])
    transfer = a.read(local, [0], remote, [0])
    transfer.wait()
    assert np.array_equal(src, dst)
    assert transfer.ops == 1 and transfer.peer == "b" and transfer.elapsed is not None
    assert "done" in repr(transfer)
    b_reg.deregister()
    a_reg.deregister()


def test_agents_find_each_other_through_the_side_channel():
    with kvferry.Agent("server") as server, kvferry.Agent("client") as client:
        host, port = server.serve_side_channel()
        assert client.connect_peer(f"{host}:{port}", timeout=5) == "server"
        assert client.peers() == ["server"]
        assert "client" in server.peers()
        client.remove_peer("server")
        assert client.peers() == []


def test_a_dropped_pending_transfer_does_not_crash(pair):
    a, b = pair(shm=False)
    a_reg, _, local, remote = link_whole(a, b, np.zeros(1 << 20, np.uint8), pattern(1 << 20, 6))
    for _ in range(8):
        a.read(local, [0], remote, [0])  # dropped at once, maybe still running
    # Deregistering waits for the transfers still using the memory.
    a_reg.deregister()
    with pytest.raises(kvferry.DescriptorError) as e:
        a.read(local, [0], remote, [0]).wait()
    assert e.value.code_name == "NotRegistered"
