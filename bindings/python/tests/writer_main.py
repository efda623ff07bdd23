"""A remote writer in its own process for test_tensor_memory.py.

`writer_main.py SIDE ADDR LEN`: connects to the agent behind side channel SIDE, then for every
line `write SEED` read from stdin WRITEs LEN bytes of pattern SEED to ADDR there (the address it
learnt when it connected, whatever has happened to that memory since) and prints the outcome:
`ok` or the error's code name. Its first line is JSON: its own buffer's address and length.
"""

import json
import sys

import numpy as np

import kvferry


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def main() -> None:
    side, addr, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    source = np.zeros(length, np.uint8)
    with kvferry.Agent("writer", shm=False) as agent:
        reg = agent.register(source)
        target = agent.connect_peer(side, timeout=10)
        local = agent.prepare_local([(reg.addr, length)])
        remote = agent.prepare_remote(target, [(addr, length)])
        print(json.dumps({"addr": reg.addr, "len": length}), flush=True)
        for line in sys.stdin:
            command, seed = line.split()
            assert command == "write", command
            source[:] = pattern(length, int(seed))
            try:
                agent.write(local, [0], remote, [0], timeout=10).wait()
                print("ok", flush=True)
            except kvferry.KvferryError as e:
                print(e.code_name, flush=True)


if __name__ == "__main__":
    main()
