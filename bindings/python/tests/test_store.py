"""The tier store from Python: byte-exact puts and gets through DRAM and disk, events, errors."""

import mmap
import subprocess
import sys

import numpy as np
import pytest

import kvferry
from conftest import pattern

BLOCK = 4096
HALF = BLOCK // 2


def layer_regions(array: np.ndarray, index: int):
    """Block `index` of `array` as two regions (two layers, say) that add up to a block."""
    base = array.ctypes.data + index * BLOCK
    return [(base, HALF), (base + HALF, HALF)]


def blocks_of(keys, array, indices):
    return [(keys[i], layer_regions(array, i)) for i in indices]


def test_put_lookup_get_in_dram_byte_exact():
    keys = kvferry.prefix_keys(range(8 * 16), 16)
    source, dest = pattern(8 * BLOCK, 20), np.zeros(8 * BLOCK, np.uint8)
    with kvferry.TierStore(BLOCK, 16 * BLOCK) as store:
        assert store.block_size == BLOCK
        op = store.put(blocks_of(keys, source, range(8)))
        op.wait(10)
        assert op.poll() and repr(op) == "StoreOp(done)"
        assert store.lookup(keys) == ["CPU"] * 8
        # A prefix stops at the first block not cached.
        assert store.lookup([keys[0], kvferry.chain_key(keys[0], [7]), keys[2]]) == ["CPU"]
        store.get(blocks_of(keys, dest, range(8))).wait(10)
        assert np.array_equal(source, dest)
        stats = store.stats()
        assert stats["host_blocks"] == 8 and stats["host_hits"] == 8 and stats["host_capacity_blocks"] == 16
        events = store.take_events()
        assert [(e.kind, e.medium, e.from_medium) for e in events] == [("stored", "CPU", None)]
        assert events[0].keys == keys
        assert store.take_events() == []
        store.clear()
        assert store.lookup(keys) == []
        # The clear names the blocks it forgot, then says the store is empty.
        events = store.take_events()
        assert [(e.kind, e.medium) for e in events] == [("removed", "CPU"), ("cleared", None)]
        assert set(events[0].keys) == set(keys) and events[1].keys == []
        assert repr(events[1]) == 'TierEvent(kind="cleared", keys=<0>)'
        assert "TierStore" in repr(store)
    with pytest.raises(ValueError, match="closed"):
        store.lookup(keys)


def test_a_small_dram_serves_blocks_back_from_disk(tmp_path):
    count = 12
    keys = [kvferry.engine_key(i) for i in range(count)]
    source, dest = pattern(count * BLOCK, 21), np.zeros(count * BLOCK, np.uint8)
    with kvferry.TierStore(BLOCK, 4 * BLOCK, disk_dir=tmp_path, disk_capacity=64 * BLOCK) as store:
        # A batch needs DRAM for all its blocks at once: put four at a time.
        for start in range(0, count, 4):
            store.put(blocks_of(keys, source, range(start, start + 4))).wait(10)
        media = store.lookup(keys)
        assert media[:8] == ["DISK"] * 8 and media[8:] == ["CPU"] * 4
        for start in range(0, count, 4):
            store.get(blocks_of(keys, dest, range(start, start + 4))).wait(10)
        assert np.array_equal(source, dest)
        stats = store.stats()
        assert stats["disk_hits"] >= 8 and stats["disk_writes"] >= 8 and not stats["disk_failed"]
        assert stats["promotions"] >= 8, stats
        events = store.take_events()
        moved = [k for e in events if (e.kind, e.from_medium, e.medium) == ("moved", "CPU", "DISK") for k in e.keys]
        assert set(keys[:8]) <= set(moved)
        stored = {k for e in events if (e.kind, e.medium) == ("stored", "CPU") for k in e.keys}
        assert stored == set(keys)
        # Offload sends DRAM blocks down.
        store.offload(keys[8:]).wait(10)
        assert store.lookup(keys[8:]) == ["DISK"] * 4
    # The disk tier survives the store: a new one on the directory finds the blocks.
    with kvferry.TierStore(BLOCK, 4 * BLOCK, disk_dir=str(tmp_path), disk_capacity=64 * BLOCK) as again:
        assert again.lookup(keys[8:]) == ["DISK"] * 4
        dest[:] = 0
        again.get(blocks_of(keys, dest, range(8, 12))).wait(10)
        assert np.array_equal(source[8 * BLOCK :], dest[8 * BLOCK :])


def test_store_errors_are_tier_errors_with_codes(tmp_path):
    keys = kvferry.prefix_keys(range(32), 16)
    memory = np.zeros(2 * BLOCK, np.uint8)

    def code_of(call):
        with pytest.raises(kvferry.TierError) as e:
            call()
        return e.value.code_name

    with kvferry.TierStore(BLOCK, 2 * BLOCK, events=False) as store:
        # A missing block fails the get, naming it (at submit or through the operation).
        assert code_of(lambda: store.get(blocks_of(keys, memory, [0])).wait(10)) == "TierNotCached"
        short = [(keys[0], [(memory.ctypes.data, HALF)])]
        assert code_of(lambda: store.put(short).wait(10)) == "TierBadBlock"
        assert code_of(lambda: store.put([(bytes(33), layer_regions(memory, 0))])) == "TierBadKey"
        too_many = [(kvferry.engine_key(i), layer_regions(memory, 0)) for i in range(3)]
        assert code_of(lambda: store.put(too_many).wait(10)) == "TierNoRoom"
        with pytest.raises(ValueError, match="events=False"):
            store.take_events()
        with pytest.raises(ValueError, match="device"):
            store.put(blocks_of(keys, memory, [0]), device="gpu")
    # A value no store takes is refused by the options parser every front end shares; one that
    # only this configuration cannot use, by the store.
    with pytest.raises(kvferry.InvalidArgumentError, match="block_size"):
        kvferry.TierStore(0, BLOCK)
    assert code_of(lambda: kvferry.TierStore(BLOCK, BLOCK // 2)) == "TierConfig"
    a_file = tmp_path / "file"
    a_file.write_bytes(b"not a directory")
    assert code_of(lambda: kvferry.TierStore(BLOCK, BLOCK, disk_dir=a_file, disk_capacity=BLOCK)) in (
        "TierDiskUnavailable",
        "TierConfig",
    )
    with pytest.raises(ValueError, match="policy"):
        kvferry.TierStore(BLOCK, BLOCK, policy="mru")
    with pytest.raises(ValueError, match="disk.dir"):
        kvferry.TierStore(BLOCK, BLOCK, disk_capacity=BLOCK)


def test_torch_tensors_go_through_the_store(torch):
    keys = kvferry.prefix_keys(range(64), 16)
    source = torch.from_numpy(pattern(4 * BLOCK, 22)).view(torch.bfloat16).reshape(4, -1)
    dest = torch.zeros_like(source)
    with kvferry.TierStore(BLOCK, 8 * BLOCK, policy="arc", workers=1) as store:
        put = [(keys[i], [(source[i].data_ptr(), BLOCK)]) for i in range(4)]
        store.put(put).wait(10)
        store.get([(keys[i], [(dest[i].data_ptr(), BLOCK)]) for i in range(4)]).wait(10)
    assert torch.equal(source.view(torch.uint8), dest.view(torch.uint8))


def test_a_dropped_store_op_finishes_and_closing_waits_for_it():
    keys = [kvferry.engine_key(i) for i in range(64)]
    source, dest = pattern(64 * BLOCK, 23), np.zeros(64 * BLOCK, np.uint8)
    store = kvferry.TierStore(BLOCK, 64 * BLOCK)
    store.put(blocks_of(keys, source, range(64)))  # dropped at once
    store.close()  # runs what was submitted to the end
    store.close()
    store = kvferry.TierStore(BLOCK, 64 * BLOCK)
    store.put(blocks_of(keys, source, range(64))).wait()
    op = store.get(blocks_of(keys, dest, range(64)))
    del op
    store.close()
    assert np.array_equal(source, dest)


def page_aligned(nbytes: int) -> np.ndarray:
    """Anonymous mapped memory: page-aligned, as direct disk reads and writes need."""
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


def test_blocks_go_straight_to_disk_and_back_into_caller_memory(tmp_path):
    count = 6
    keys = [kvferry.engine_key(i) for i in range(count)]
    source, dest = page_aligned(count * BLOCK), page_aligned(count * BLOCK)
    source[:] = pattern(count * BLOCK, 24)

    def whole(array, i):
        return (keys[i], [(array.ctypes.data + i * BLOCK, BLOCK)])

    with kvferry.TierStore(BLOCK, BLOCK, disk_dir=tmp_path, disk_capacity=count * BLOCK, pin=False) as store:
        store.put([whole(source, i) for i in range(count)], to_disk=True).wait(10)
        assert store.lookup(keys) == ["DISK"] * count
        stats = store.stats()
        assert stats["host_blocks"] == 0 and stats["disk_blocks"] == count
        events = store.take_events()
        assert [(e.kind, e.medium) for e in events] == [("stored", "DISK")] and events[0].keys == keys
        store.get([whole(dest, i) for i in range(count)], from_disk=True).wait(10)
        assert np.array_equal(source, dest)
        assert store.stats()["host_blocks"] == 0, "a direct read promotes nothing"
        # One region each, 4096-aligned, in host memory.
        with pytest.raises(kvferry.TierError) as split:
            store.put([(keys[0], layer_regions(source, 0))], to_disk=True)
        assert split.value.code_name == "TierBadBlock"
        with pytest.raises(kvferry.TierError) as unaligned:
            store.get([(keys[0], [(dest.ctypes.data + 512, BLOCK)])], from_disk=True)
        assert unaligned.value.code_name == "TierBadBlock"
        with pytest.raises(ValueError, match="host memory"):
            store.put([whole(source, 0)], device="cuda:0", to_disk=True)
        # More new blocks than the disk has slots: refused whole, nothing written or evicted.
        more = [(kvferry.engine_key(100 + i), [(source.ctypes.data, BLOCK)]) for i in range(count + 1)]
        with pytest.raises(kvferry.TierError) as too_big:
            store.put(more, to_disk=True).wait(10)
        assert too_big.value.code_name == "TierDiskFull"
        assert store.lookup([kvferry.engine_key(100)]) == [] and store.lookup(keys) == ["DISK"] * count


def test_a_disk_directory_is_locked_against_a_second_process(tmp_path):
    child = (
        "import sys, kvferry\n"
        "try:\n"
        "    kvferry.TierStore(4096, 4096, disk_dir=sys.argv[1], disk_capacity=4 * 4096).close()\n"
        "    print('opened')\n"
        "except kvferry.TierError as e:\n"
        "    print(e.code_name, e.code)\n"
    )

    def open_elsewhere() -> str:
        done = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    with kvferry.TierStore(BLOCK, BLOCK, disk_dir=tmp_path, disk_capacity=4 * BLOCK):
        assert open_elsewhere() == "TierDiskLocked 612"
    assert open_elsewhere() == "opened"


def test_a_store_killed_with_sigkill_leaves_its_blocks_listed_and_no_lock(tmp_path):
    # The child writes blocks straight to disk, says so, and waits holding the store open until it
    # is killed: no close, no flush, as an engine killed with `kill -9`.
    child = (
        "import sys, time, numpy as np, kvferry\n"
        "keys = kvferry.prefix_keys(range(3 * 16), 16)\n"
        "source = np.zeros(3 * 4096 + 4096, np.uint8)\n"
        "base = (source.ctypes.data + 4095) // 4096 * 4096\n"
        "for i in range(3):\n"
        "    np.frombuffer(source, np.uint8)[base - source.ctypes.data + i * 4096:][:4096] = 50 + i\n"
        "store = kvferry.TierStore(4096, 4096, disk_dir=sys.argv[1], disk_capacity=8 * 4096)\n"
        "store.put([(k, [(base + i * 4096, 4096)]) for i, k in enumerate(keys)], to_disk=True).wait(30)\n"
        "print('stored', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stored"
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    keys = kvferry.prefix_keys(range(3 * 16), 16)
    # The kernel released the dead process's lock: a restarted store opens the directory.
    with kvferry.TierStore(BLOCK, 4 * BLOCK, disk_dir=tmp_path, disk_capacity=8 * BLOCK) as store:
        assert store.disk_keys() == keys
        assert store.lookup(keys) == ["DISK"] * 3
        dest = np.zeros(3 * BLOCK, np.uint8)
        store.get([(k, [(dest.ctypes.data + i * BLOCK, BLOCK)]) for i, k in enumerate(keys)]).wait(30)
        assert [set(dest[i * BLOCK : (i + 1) * BLOCK]) for i in range(3)] == [{50}, {51}, {52}]
        store.clear()
        assert store.disk_keys() == []
    with kvferry.TierStore(BLOCK, BLOCK) as dram_only:
        assert dram_only.disk_keys() == []
