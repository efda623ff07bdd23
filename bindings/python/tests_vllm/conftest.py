"""End-to-end tests of `kvferry.vllm.KvferryConnector` on real vLLM (CPU build), each engine in its
own process. They need vLLM, torch and transformers; without them they skip, saying why, unless
KVFERRY_REQUIRE_VLLM=1 (the project's test script) turns the skip into a failure."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _missing() -> str | None:
    for module in ("vllm", "torch", "transformers", "zmq", "msgspec"):
        try:
            __import__(module)
        except ImportError as e:
            return f"{module} is not importable ({e})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _missing()
    if reason is None:
        return
    if os.environ.get("KVFERRY_REQUIRE_VLLM") == "1":
        raise pytest.UsageError(f"KVFERRY_REQUIRE_VLLM=1 but {reason}")
    for item in items:
        item.add_marker(pytest.mark.skip(reason=f"vLLM end-to-end tests need vLLM: {reason}"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    run([sys.executable, str(HERE / "make_model.py"), str(path)], tmp_path_factory.mktemp("log") / "model.log", 300)
    return path


@pytest.fixture(scope="session")
def windowed_model(tmp_path_factory) -> Path:
    """A model whose KV cache vLLM keeps in two groups: full attention and a sliding window."""
    path = tmp_path_factory.mktemp("windowed-llama")
    run([sys.executable, str(HERE / "make_model.py"), str(path), "--windowed"], tmp_path_factory.mktemp("log") / "m.log", 300)
    return path


# What every engine these tests start is given, whatever the order fixtures run in. vLLM's CPU build
# sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); without it, from a share of the machine's
# memory, which on a small machine is less than the engine's own footprint. The cluster secret lets
# the engines' agents prove themselves to each other.
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "KVFERRY_SECRET": "the vLLM end-to-end tests' cluster secret",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log: Path, timeout: float) -> None:
    """Run a child to completion, its output in `log`; fail with the log's tail if it fails."""
    with open(log, "w") as out:
        try:
            env = {**os.environ, **ENGINE_ENV}
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        tail = log.read_text()[-6000:]
        pytest.fail(f"{' '.join(cmd)} ended with {code}:\n{tail}")
