"""Two processes under torchrun against one, on this machine, for the same work.

The work is ``tests/distributed/run.py``: fit every built-in plugin on the shared
ResNet-20 (2000 train, 1000 calibration, 1000 unlabelled images) and evaluate on 1000
test and 500 MNIST images; and the shard-aware ``sharded`` model, also evaluated on
1001 test and 1001 MNIST images. One process with two intra-op threads against two gloo
ranks with one thread each, on the same 2 cores. Needs ../shared/data.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "tests" / "distributed" / "run.py"


def timed(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    with socket.socket() as s:  # a free port, released before torchrun binds it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        one = timed([sys.executable, str(RUN), f"{tmp}/one"], threads=2)
        two = timed(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             f"--master_port={port}", str(RUN), f"{tmp}/two"],
            threads=1,
        )  # fmt: skip
    print(f"one process, 2 threads: {one:.1f} s")
    print(f"two ranks (torchrun, gloo), 1 thread each: {two:.1f} s  ->  speed-up {one / two:.2f}x")


if __name__ == "__main__":
    main()
