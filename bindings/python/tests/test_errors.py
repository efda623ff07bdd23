"""Every failure raises its typed exception with kvferry's code; bad arguments raise as Python does."""

import builtins
import pickle
import socket

import numpy as np
import pytest

import kvferry
from conftest import link_whole
from kvferry._errors import error_for

RANGES = {
    1: kvferry.RegistrationError,
    2: kvferry.LayoutError,
    3: kvferry.MetadataError,
    4: kvferry.DescriptorError,
    5: kvferry.TransferError,
    6: kvferry.TierError,
}


def test_every_code_maps_to_the_class_of_its_range():
    codes = kvferry.ERROR_CODES
    assert codes["InvalidArgument"] == 1 and codes["Timeout"] == 500 and codes["TierClosed"] == 611
    for name, code in codes.items():
        error = error_for(code, name, "why")
        assert isinstance(error, kvferry.KvferryError)
        assert (error.code, error.code_name) == (code, name)
        assert str(error) == f"[{name} {code}] why"
        if code // 100 in RANGES:
            assert isinstance(error, RANGES[code // 100])
    assert isinstance(error_for(1, "InvalidArgument", ""), ValueError)
    assert isinstance(error_for(500, "Timeout", ""), builtins.TimeoutError)
    assert isinstance(error_for(500, "Timeout", ""), kvferry.TransferError)
    # Codes of ranges kvferry adds later still raise its base class.
    assert type(error_for(700, "Discovery", "")) is kvferry.KvferryError
    # Exceptions cross process boundaries (multiprocessing) with their code.
    copy = pickle.loads(pickle.dumps(error_for(405, "UnknownPeer", "who?")))
    assert (type(copy), copy.code, copy.code_name) == (kvferry.DescriptorError, 405, "UnknownPeer")


@pytest.mark.parametrize(
    "blob,name",
    [(b"", "MetadataTruncated"), (b"junkjunkjunk", "MetadataBadMagic")],
)
def test_bad_metadata_is_a_metadata_error(blob, name):
    with kvferry.Agent("a") as agent:
        with pytest.raises(kvferry.MetadataError) as e:
            agent.add_peer(blob)
    assert e.value.code_name == name and e.value.code == kvferry.ERROR_CODES[name]


def test_corrupt_metadata_is_a_metadata_error():
    with kvferry.Agent("a") as a, kvferry.Agent("b") as b:
        blob = bytearray(b.metadata())
        blob[-1] ^= 0xFF
        with pytest.raises(kvferry.MetadataError) as e:
            a.add_peer(bytes(blob))
        assert 300 <= e.value.code < 400


def test_descriptor_errors_carry_their_codes(pair):
    a, b = pair(shm=False)
    a_reg, b_reg, local, remote = link_whole(a, b, np.zeros(4096, np.uint8), np.zeros(4096, np.uint8))

    def code_of(call):
        with pytest.raises(kvferry.DescriptorError) as e:
            call()
        return e.value.code_name

    assert code_of(lambda: a.read(local, [1], remote, [0])) == "DescIndexOutOfRange"
    assert code_of(lambda: a.read(local, [], remote, [])) == "EmptyTransfer"
    assert code_of(lambda: a.prepare_local([(a_reg.addr + 4000, 200)])) == "NotRegistered"
    assert code_of(lambda: a.prepare_local([(a_reg.addr, 0)])) == "ZeroLength"
    assert code_of(lambda: a.prepare_remote("b", [(b_reg.addr + 1, 4096)])) == "RemoteRegionUnknown"
    assert code_of(lambda: a.prepare_remote("nobody", [(b_reg.addr, 4096)])) == "UnknownPeer"
    assert code_of(lambda: a.notify("nobody", b"x")) == "UnknownPeer"
    assert code_of(lambda: a.remove_peer("nobody")) == "UnknownPeer"
    half = a.prepare_local([(a_reg.addr, 2048)])
    assert code_of(lambda: a.write(half, [0], remote, [0])) == "LengthMismatch"
    # Lists swapped: the local list where the remote one goes.
    with pytest.raises(kvferry.InvalidArgumentError, match="the local list was prepared for a peer"):
        a.read(remote, [0], local, [0])
    with pytest.raises(kvferry.InvalidArgumentError, match="the remote list was prepared for local memory"):
        a.read(local, [0], local, [0])


def test_a_refused_connection_is_a_transfer_error():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now
    with kvferry.Agent("a") as agent:
        with pytest.raises(kvferry.TransferError) as e:
            agent.connect_peer(f"127.0.0.1:{port}", timeout=2)
        assert 500 <= e.value.code < 600


def test_bad_python_arguments_raise_value_and_type_errors():
    with kvferry.Agent("a") as agent:
        with pytest.raises(TypeError):
            agent.register(object())
        with pytest.raises(ValueError, match="read-only"):
            agent.register(b"immutable bytes")
        with pytest.raises(ValueError, match="C-contiguous"):
            agent.register(np.zeros((8, 8), np.uint8)[:, ::2])
        with pytest.raises(ValueError, match="empty"):
            agent.register(bytearray())
        with pytest.raises(ValueError, match="device"):
            agent.register_ptr(0x1000, 64, "tpu:0")
        with pytest.raises(ValueError, match="host memory"):
            agent.register(bytearray(64), device="cuda:0")
        for bad in [-1, float("nan"), float("inf"), 1e19, 1e30]:
            with pytest.raises(ValueError, match="timeout"):
                agent.wait_notifications(bad)
        with pytest.raises(ValueError, match="IP address"):
            agent.serve_side_channel("not a host")
        with pytest.raises(OverflowError):
            agent.register_ptr(-1, 64)
    with pytest.raises(ValueError, match="closed"):
        agent.metadata()
    agent.close()  # closing twice is harmless
    with pytest.raises(kvferry.InvalidArgumentError) as e:
        kvferry.Agent("")
    assert e.value.code == 1


def test_registered_memory_cannot_move_away():
    buffer = bytearray(4096)
    with kvferry.Agent("a") as agent:
        reg = agent.register(buffer)
        with pytest.raises(BufferError):
            buffer.extend(b"x")  # would reallocate the registered bytes
        reg.deregister()
        reg.deregister()
        assert "deregistered" in repr(reg)
        buffer.extend(b"x")


def test_a_transfer_past_its_deadline_is_a_timeout_error(pair):
    a, b = pair(shm=False)
    a_reg, b_reg, local, remote = link_whole(a, b, np.zeros(4096, np.uint8), np.zeros(4096, np.uint8))
    with pytest.raises(kvferry.TransferTimeoutError) as e:
        a.read(local, [0], remote, [0], timeout=0).wait()
    assert isinstance(e.value, builtins.TimeoutError) and e.value.code_name == "Timeout"
    # The agent is fine afterwards.
    a.read(local, [0], remote, [0]).wait()


def test_gpu_memory_without_a_gpu_path_is_a_typed_error():
    """CUDA memory needs an agent opened with cuda_device=N; without a GPU that open fails typed."""
    memory = np.zeros(4096, np.uint8)
    with kvferry.Agent("a") as agent:
        with pytest.raises(kvferry.UnsupportedError) as e:
            agent.register_ptr(memory.ctypes.data, 4096, "cuda:0")
        assert "no enabled transport" in str(e.value)
    try:
        kvferry.Agent("gpu", cuda_device=0).close()
        return  # a CUDA device is present: nothing more fails here
    except kvferry.RegistrationError as e:
        assert e.code_name in ("NoDriver", "NoDevice", "DeviceCallFailed")
    with kvferry.TierStore(4096, 4096) as store:
        with pytest.raises(kvferry.RegistrationError):
            store.put([(b"k", [(memory.ctypes.data, 4096)])], device="cuda:0")
        with pytest.raises(kvferry.UnsupportedError):
            store.put([(b"k", [(memory.ctypes.data, 4096)])], device="rocm:0")


def test_agent_options_are_read_by_the_parser_every_front_end_shares():
    """`options` takes any agent option by the C ABI's key; the core's parser refuses what it refuses,
    with the same words, and applies the options after the keyword arguments."""
    with kvferry.Agent("opts", options={"tcp.streams": 4, "max_peers": 3, "shm": False, "auth": "none"}) as agent:
        assert agent.name == "opts"
    cases = [
        ({"tcp.streams": 0}, r'option tcp\.streams: "0" is not a stream count from 1 to 64'),
        ({"tcp.connect_timeout_ms": 0}, r'option tcp\.connect_timeout_ms: "0" is not a positive number'),
        ({"shm": "maybe"}, r'option shm: "maybe" is not on or off'),
        ({"tcp.colour": "blue"}, r'unknown option "tcp\.colour"; known options: tcp, tcp\.listen'),
        ({"tls.cert": "/c.pem"}, r"TLS needs all three of tls\.cert, tls\.key and tls\.ca"),
    ]
    for options, message in cases:
        with pytest.raises(kvferry.InvalidArgumentError, match=message) as caught:
            kvferry.Agent("bad", options=options)
        assert caught.value.code == 1 and isinstance(caught.value, ValueError)
    # Applied after the keywords: the options turn off what the keywords turned on.
    with pytest.raises(kvferry.KvferryError, match="transport"):
        kvferry.Agent("none-left", tcp=True, shm=True, options={"tcp": False, "shm": False})
    with pytest.raises(TypeError, match="bool, an int or a str"):
        kvferry.Agent("bad", options={"tcp.streams": 1.5})
