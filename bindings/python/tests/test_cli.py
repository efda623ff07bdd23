"""The ``kvferry`` command ships in the package: its console script (and ``python -m kvferry``)
runs the same command line as the native binary."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def kvferry_command() -> list[str]:
    """The console script pip installed next to this interpreter, else ``python -m kvferry``."""
    script = Path(sys.executable).parent / "kvferry"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "kvferry"]


def run(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*kvferry_command(), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_console_script_is_installed_with_the_package():
    # The wheel's entry point: pip writes it next to the interpreter (a develop install too).
    assert (Path(sys.executable).parent / "kvferry").exists() or shutil.which("kvferry"), sys.executable


def test_info_lists_the_transports_of_this_build():
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    transports = {t["name"]: t for t in info["transports"]}
    assert transports["tcp"]["available"], transports
    assert "fabric" in transports, transports


def test_a_missing_libfabric_is_reported_unavailable_not_a_load_failure():
    missing = "/nonexistent/libfabric.so.1"
    proc = run("info", "--json", KVFERRY_LIBFABRIC=missing)
    assert proc.returncode == 0, proc.stderr
    fabric = next(t for t in json.loads(proc.stdout)["transports"] if t["name"] == "fabric")
    assert not fabric["available"] and "could not be loaded" in fabric["detail"], fabric


def test_bench_moves_bytes_over_the_embedded_loopback():
    proc = run(
        "bench", "--transport", "tcp", "--block-sizes", "64K", "--batch-sizes", "4", "--min-time", "0.2", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert {r["op"] for r in rows} == {"read", "write"}, rows
    assert all(r["gbps"] > 0 and r["block_size"] == 65536 for r in rows), rows


def test_soak_starts_its_targets_through_the_same_launcher():
    # soak starts `serve` children as copies of itself: through the package, `python -m kvferry`.
    proc = run("soak", "--seconds", "3", "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["reads"] > 0 and report["bytes_checked"] > 0, report
    assert sum(report["failures"].values()) == 0, report


def test_bad_arguments_exit_non_zero_with_usage():
    proc = run("bench", "--no-such-flag")
    assert proc.returncode != 0
    assert "Usage" in proc.stderr or "usage" in proc.stderr, proc.stderr
