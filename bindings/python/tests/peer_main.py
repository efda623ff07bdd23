"""A peer in its own process for test_processes.py: serves `BLOCKS` blocks of a known pattern.

Prints one JSON line (side channel address, buffer address and length), then answers
notifications: b"check" -> b"ok" or b"bad" after comparing its buffer with the pattern the other
side writes; b"quit" -> exit.
"""

import json
import sys

import numpy as np

import kvferry

BLOCK = 4096
BLOCKS = 16


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def main() -> None:
    shm = sys.argv[1] == "shm"
    memory = pattern(BLOCK * BLOCKS, 10)
    with kvferry.Agent("peer", shm=shm) as agent:
        reg = agent.register(memory)
        host, port = agent.serve_side_channel()
        print(json.dumps({"side": f"{host}:{port}", "addr": reg.addr, "len": reg.length}), flush=True)
        while True:
            for sender, data in agent.wait_notifications(60):
                if data == b"quit":
                    return
                if data == b"check":
                    # The other side wrote its pattern (seed 11) over the second half.
                    half = BLOCK * BLOCKS // 2
                    good = np.array_equal(memory[half:], pattern(BLOCK * BLOCKS, 11)[half:])
                    good &= np.array_equal(memory[:half], pattern(BLOCK * BLOCKS, 10)[:half])
                    agent.notify(sender, b"ok" if good else b"bad").wait(10)


if __name__ == "__main__":
    main()
