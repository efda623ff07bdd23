"""Importing kvferry maps no libfabric: the fabric transport opens it when it starts, and keeps the
process's signal handlers (Debian's libfabric brings psm's libinfinipath, whose handlers for
SIGTERM, SIGINT, SIGSEGV, ... call exit() from inside the handler). Each case is a fresh process."""

import json
import os
import subprocess
import sys

import pytest

FABRIC_LIBRARIES = ["libfabric", "libinfinipath", "libpsm", "libefa"]

CHILD = """
import json, sys
import kvferry

LIBRARIES = {libraries!r}

def state():
    maps = open("/proc/self/maps").read()
    caught = next(l for l in open("/proc/self/status") if l.startswith("SigCgt:"))
    return [lib for lib in LIBRARIES if lib in maps], caught.split()[1]

agent = kvferry.Agent("tcp-only", shm=False)
out = {{"tcp": state()}}
try:
    kvferry.Agent("fabric", tcp=False, shm=False, fabric_provider="tcp")
    out["fabric"] = state()
except kvferry.KvferryError as e:
    out["error"] = [e.code, str(e)]
print(json.dumps(out))
"""


def run_child(**env) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(libraries=FABRIC_LIBRARIES)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_libfabric_is_mapped_only_once_the_fabric_transport_starts_and_keeps_the_signal_handlers():
    out = run_child()
    if "error" in out and out["error"][0] == 522:
        # The fabric transport's typed "unavailable": this machine has no loadable libfabric.
        pytest.skip(f"no libfabric here: {out['error'][1]}")
    assert "error" not in out, out
    tcp_mapped, tcp_caught = out["tcp"]
    assert tcp_mapped == [], f"mapped by an agent without the fabric transport: {tcp_mapped}"
    fabric_mapped, fabric_caught = out["fabric"]
    assert "libfabric" in fabric_mapped, out
    assert fabric_caught == tcp_caught, f"signals caught before and after libfabric: {tcp_caught} {fabric_caught}"


def test_a_missing_libfabric_raises_the_typed_error_when_the_fabric_transport_starts():
    missing = "/nonexistent/libfabric.so.1"
    out = run_child(KVFERRY_LIBFABRIC=missing)
    code, message = out["error"]
    assert code == 522, out
    assert "could not be loaded" in message and missing in message, message
    assert out["tcp"][0] == [], out
