"""Transfers driven from Python next to this machine's memcpy, measured in the same run.

    python bindings/python/bench/transfer.py [--transport shm|tcp] [--seconds S]

Prints, per block size: bandwidth of 64-block READs between two agents in this process, the same
bytes copied by numpy (memcpy, the limit of a same-host transfer), their ratio, and the latency of
a one-block READ from post to wait (what a connector's step pays per call).
"""

import argparse
import time

import numpy as np

import kvferry

BATCH = 64


def calls_per_second(run, seconds):
    run()  # warm up
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        calls += 1
    return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["shm", "tcp"], default="shm")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    shm = args.transport == "shm"
    print(f"transport={args.transport} batch={BATCH} blocks")
    print(f"{'block':>8} {'READ GB/s':>10} {'memcpy GB/s':>12} {'ratio':>6} {'1-block READ us':>16}")
    with kvferry.Agent("a", shm=shm) as a, kvferry.Agent("b", shm=shm) as b:
        for block in [4 << 10, 64 << 10, 1 << 20]:
            src = np.random.default_rng(0).integers(0, 256, block * BATCH, dtype=np.uint8)
            dst = np.zeros_like(src)
            a_reg, b_reg = a.register(dst), b.register(src)
            a.add_peer(b.metadata())
            local = a.prepare_local([(a_reg.addr + i * block, block) for i in range(BATCH)])
            remote = a.prepare_remote("b", [(b_reg.addr + i * block, block) for i in range(BATCH)])
            every = list(range(BATCH))
            rate = calls_per_second(lambda: a.read(local, every, remote, every).wait(), args.seconds)
            assert np.array_equal(src, dst)
            copies = calls_per_second(lambda: np.copyto(dst, src), args.seconds)
            calls = calls_per_second(lambda: a.read(local, [0], remote, [0]).wait(), args.seconds)
            gbps, memcpy = rate * block * BATCH / 1e9, copies * block * BATCH / 1e9
            print(f"{block >> 10:>6}Ki {gbps:>10.2f} {memcpy:>12.2f} {gbps / memcpy:>6.2f} {1e6 / calls:>16.1f}")
            a_reg.deregister()
            b_reg.deregister()


if __name__ == "__main__":
    main()
