"""The remote tier from Python, on a shared directory: one store's blocks found and read by another
with an empty DRAM, corrupt objects refused, settings checked."""

import os
import time

import numpy as np
import pytest

import kvferry
from conftest import pattern

BLOCK = 4096


def regions(array: np.ndarray, index: int):
    return [(array.ctypes.data + index * BLOCK, BLOCK)]


def blocks_of(keys, array):
    return [(k, regions(array, i)) for i, k in enumerate(keys)]


def until_found(lookup, keys, timeout=10.0):
    """`lookup(keys)` once it stops answering None (the remote is asked in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        found = lookup(keys)
        if found is not None:
            return found
        assert time.monotonic() < deadline, "the remote lookup did not end"
        time.sleep(0.005)


def settings(path, namespace="model-a/rank0"):
    return {"path": str(path), "namespace": namespace, "timeout": 5.0}


def test_blocks_stored_by_one_store_are_read_by_another_with_an_empty_dram(tmp_path):
    keys = kvferry.prefix_keys(range(6 * 16), 16)
    source, dest = pattern(6 * BLOCK, 31), np.zeros(6 * BLOCK, np.uint8)
    with kvferry.TierStore(BLOCK, 8 * BLOCK, remote=settings(tmp_path)) as writer:
        writer.put(blocks_of(keys, source)).wait(10)
        assert writer.flush_remote(10)
        assert writer.stats()["remote"]["uploads"] == 6
        kinds = [(e.kind, e.medium) for e in writer.take_events()]
        assert ("stored", "CPU") in kinds and kinds.count(("stored", "REMOTE")) == 6
    with kvferry.TierStore(BLOCK, 8 * BLOCK, remote=settings(tmp_path)) as reader:
        assert reader.lookup(keys) == []
        assert until_found(reader.lookup_remote, keys) == ["REMOTE"] * 6
        reader.get(blocks_of(keys, dest)).wait(10)
        assert np.array_equal(source, dest)
        # Promoted: DRAM serves them now.
        assert reader.lookup(keys) == ["CPU"] * 6
        stats = reader.stats()["remote"]
        assert stats["hits"] == 6 and stats["corrupt"] == 0 and not stats["breaker_open"]
    # A lookup-only client in another namespace sees none of them; one in this namespace all.
    other = kvferry.RemoteTier(BLOCK, settings(tmp_path, "model-b/rank0"))
    assert until_found(other.lookup, keys) == 0
    same = kvferry.RemoteTier(BLOCK, settings(tmp_path))
    assert until_found(same.lookup, keys) == 6
    assert same.fingerprint != other.fingerprint and same.location == str(tmp_path)


def test_a_flipped_byte_in_an_object_fails_the_get_and_serves_nothing(tmp_path):
    keys = kvferry.prefix_keys(range(2 * 16), 16)
    source, dest = pattern(2 * BLOCK, 7), np.zeros(2 * BLOCK, np.uint8)
    with kvferry.TierStore(BLOCK, 4 * BLOCK, remote=settings(tmp_path)) as writer:
        writer.put(blocks_of(keys, source)).wait(10)
        assert writer.flush_remote(10)
    fingerprint = kvferry.RemoteTier(BLOCK, settings(tmp_path)).fingerprint
    victim = tmp_path / fingerprint / keys[1].hex()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with kvferry.TierStore(BLOCK, 4 * BLOCK, remote=settings(tmp_path)) as reader:
        assert until_found(reader.lookup_remote, keys) == ["REMOTE"] * 2
        with pytest.raises(kvferry.TierError) as failed:
            reader.get(blocks_of(keys, dest)).wait(10)
        assert failed.value.code_name == "TierRemoteCorrupt"
        # The intact block is kept in DRAM; the corrupt one is gone from the directory.
        assert reader.lookup(keys) == ["CPU"]
        assert not victim.exists()
        assert np.count_nonzero(dest[BLOCK:]) == 0
        assert reader.stats()["remote"]["corrupt"] == 1


def test_bad_remote_settings_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="remote.url or remote.path"):
        kvferry.TierStore(BLOCK, BLOCK, remote={"namespace": "x"})
    with pytest.raises(ValueError, match="namespace"):
        kvferry.TierStore(BLOCK, BLOCK, remote={"path": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown option"):
        kvferry.TierStore(BLOCK, BLOCK, remote={**settings(tmp_path), "bucket": "b"})
    with pytest.raises(kvferry.TierError) as failed:
        kvferry.TierStore(BLOCK, BLOCK, remote={"url": "ftp://host/x", "namespace": "x"})
    assert failed.value.code_name == "TierConfig"
    with pytest.raises(kvferry.TierError):
        kvferry.RemoteTier(BLOCK, {"url": "s3://b/p", "namespace": "x", "options": {"no_such_option": "1"}})


def test_an_unreachable_store_answers_lookups_as_misses_and_keeps_dram_serving(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = {
        "url": "s3://kv/prefix",
        "namespace": "ns",
        "timeout": 2.0,
        "failures_to_open": 1,
        "retry_after": 60.0,
        "options": {
            "aws_endpoint": f"http://127.0.0.1:{port}",
            "aws_allow_http": "true",
            "aws_region": "local",
            "aws_access_key_id": "id",
            "aws_secret_access_key": os.urandom(8).hex(),
        },
    }
    keys = kvferry.prefix_keys(range(4 * 16), 16)
    source, dest = pattern(4 * BLOCK, 3), np.zeros(4 * BLOCK, np.uint8)
    with kvferry.TierStore(BLOCK, 8 * BLOCK, remote=remote) as store:
        store.put(blocks_of(keys[:2], source)).wait(10)
        assert until_found(store.lookup_remote, keys) == ["CPU", "CPU"]
        store.get(blocks_of(keys[:2], dest)).wait(10)
        assert np.array_equal(source[: 2 * BLOCK], dest[: 2 * BLOCK])
        stats = store.stats()["remote"]
        assert stats["breaker_open"] and stats["errors"] >= 1 and stats["last_error"], stats
