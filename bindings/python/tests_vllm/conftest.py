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


@pytest.fixture(autouse=True)
def vllm_cpu_env(monkeypatch):
    # 1 GiB of KV cache; vLLM's CPU build reads these at engine start.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log: Path, timeout: float) -> None:
    """Run a child to completion, its output in `log`; fail with the log's tail if it fails."""
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0:
        tail = log.read_text()[-6000:]
        pytest.fail(f"{' '.join(cmd)} ended with {code}:\n{tail}")
