"""Block keys equal the Rust ones (the vectors `chained_keys_match_pinned_vectors` pins)."""

import pytest

import kvferry

PREFIX_0_64 = [
    "dbdc0b6ca540bbccd5c4062439d1f940",
    "30807fd1c44b81d2932044000baad0e4",
    "206b1e5036df9b8bd70b969c00b3cf4b",
    "58bb016c29d97fb652de44b8a2a001f0",
]


def test_chained_keys_match_the_rust_vectors():
    assert kvferry.chain_key(None, [1, 2, 3], b"salt").hex() == "59abaae1cfec5273ed3e59683822b33d"
    assert [k.hex() for k in kvferry.prefix_keys(range(64), 16)] == PREFIX_0_64
    assert kvferry.prefix_keys(list(range(32)), 16, b"lora-1")[1].hex() == "a1254d268ac26059e165c5c8f05d30e2"
    # prefix_keys is chain_key applied block after block; a partial block has no key.
    first = kvferry.chain_key(None, range(16))
    assert kvferry.chain_key(first, range(16, 32)).hex() == PREFIX_0_64[1]
    assert len(kvferry.prefix_keys(range(40), 16)) == 2
    assert kvferry.prefix_keys(range(40), 16, b"") == kvferry.prefix_keys(range(40), 16)


def test_engine_hashes_are_kept_verbatim():
    sha = bytes(range(32))
    assert kvferry.engine_key(sha) == sha
    # The same vector as the Rust test: an int hash is its 8 bytes, big-endian.
    assert kvferry.engine_key(0x123456789ABCDEF0) == bytes.fromhex("123456789abcdef0")
    # Python's builtin hash() is signed: negative values are their two's complement.
    assert kvferry.engine_key(-2) == bytes.fromhex("fffffffffffffffe")
    assert kvferry.engine_key(2**64 - 2) == kvferry.engine_key(-2)


@pytest.mark.parametrize("bad", [b"", bytes(33), 2**64])
def test_bad_keys_are_tier_errors(bad):
    with pytest.raises(kvferry.TierError) as e:
        kvferry.engine_key(bad)
    assert e.value.code_name == "TierBadKey"


def test_bad_key_arguments():
    with pytest.raises(kvferry.TierError):
        kvferry.chain_key(bytes(40), [1])
    with pytest.raises(ValueError):
        kvferry.prefix_keys([1, 2], 0)
    with pytest.raises(OverflowError):
        kvferry.prefix_keys([-1], 1)
    with pytest.raises(TypeError):
        kvferry.engine_key("a string")
