"""vLLM integration: `KvferryConnector`, a KV connector for P/D disaggregation and tier offload.

Import is lazy so `import kvferry` works without vLLM installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvferryConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvferryConnector":
        from kvferry.vllm.connector import KvferryConnector

        return KvferryConnector
    raise AttributeError(name)
