"""OpenAI-compatible vLLM servers and the example P/D proxy, each in its own process."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import ENGINE_ENV, free_port

# Tokens in a KV cache block of every engine these tests start.
BLOCK_TOKENS = 32


class Server:
    def __init__(
        self, name: str, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None, host: str = "127.0.0.1"
    ):
        self.name, self.port, self.log = name, port, log
        self.url = f"http://{host}:{port}"
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )

    def wait_ready(self, path: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        raise RuntimeError(f"{self.name} not ready in time:\n{self.tail()}")

    def tail(self) -> str:
        self._out.flush()
        return self.log.read_text()[-4000:]

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            # The whole group: vLLM's engine core and workers are children of the API server.
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._out.close()


def vllm_server(
    name: str,
    model: Path,
    log_dir: Path,
    kv_transfer_config: dict,
    env: dict[str, str] | None = None,
    netns: str | None = None,
    host: str = "127.0.0.1",
) -> Server:
    """A server listening on `host`, in network namespace `netns` (None: this process's)."""
    port = free_port()
    cmd = ["ip", "netns", "exec", netns] if netns is not None else []
    cmd += [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", host, "--port", str(port), "--served-model-name", "m",
        "--skip-tokenizer-init", "--block-size", str(BLOCK_TOKENS), "--max-model-len", "1024",
        "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.05",
        "--kv-transfer-config", json.dumps(kv_transfer_config),
    ]  # fmt: skip
    return Server(name, cmd, port, log_dir / f"{name}.log", env={**ENGINE_ENV, **(env or {})}, host=host)


def proxy(prefill: Server, decode: Server, log_dir: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "kvferry.vllm.proxy", "--prefill", prefill.url, "--decode", decode.url,
           "--port", str(port)]  # fmt: skip
    return Server("proxy", cmd, port, log_dir / "proxy.log")


def complete(url: str, prompt: list[int], max_tokens: int, timeout: float = 120, **extra) -> tuple[int, dict]:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    body.update(extra)
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# The labels `metrics` keeps apart: the source of cached prompt tokens, the medium of tier hits, the
# event of the remote tier's counter.
KEPT_LABELS = ("source", "medium", "event")


def metrics(server: Server, kept: tuple[str, ...] = KEPT_LABELS) -> dict[str, float]:
    """Prometheus samples summed over labels other than `kept`: `name{source=x}`,
    `name{medium=x}` or `name`."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        shown = [p.replace('"', "") for p in labels.rstrip("}").split(",") if p.split("=")[0] in kept]
        key = f"{name}{{{','.join(shown)}}}" if shown else name
        values[key] = values.get(key, 0.0) + float(value)
    return values
