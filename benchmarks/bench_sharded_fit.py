"""Memory per rank of a distributed fit: fit sets kept sharded against gathered.

Fits the shard-aware detectors (``react``, ``knn(shard_bank=True)`` with every row in
its bank, ``mahalanobis``, ``vim``) on synthetic rows (100 Gaussian classes, generated
from their index, so no rank holds the data set) through a small MLP backbone, and
prints for each run the fit time and the peak resident memory the fit adds above the
process's start:

* one process with every row: what the fit holds without torch.distributed;
* 2 gloo ranks with the fit sets gathered and the whole bank on every rank: every rank
  holds every row's features (what wrapcal did before the shard-aware plugins, and what
  a plugin that is not shard-aware still gets);
* 2 gloo ranks with the sets kept sharded: each rank holds its own rows' features and
  its half of the KNN bank.

The three fits must agree (Mahalanobis centre, ViM alpha, ReAct clip to 1e-6; the KNN
bank's rows, once unsharded): the script fails otherwise.

    python benchmarks/bench_sharded_fit.py [--rows 400000] [--width 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CLASSES = 100
#: The sharded run keeps the KNN bank split; the others hold all of it on every rank.
PLUGINS = {
    mode: ["react", ("knn", {"shard_bank": mode == "sharded"}), "mahalanobis", "vim"]
    for mode in ("one", "gathered", "sharded")
}


class SyntheticRows(Dataset):
    """Row ``i``: its class mean plus two rows of a fixed noise table, from ``i`` alone."""

    def __init__(self, rows: int, width: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.rows = rows
        self.means = 2 * torch.randn(CLASSES, width, generator=generator)
        self.noise = torch.randn(8192, width, generator=generator)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        labels = index % CLASSES
        rows = self.means[labels] + 0.5 * (
            self.noise[(index * 7919) % 8192] + self.noise[(index * 6007 + 13) % 8191]
        )
        return rows, labels


def batch_as_is(batch):
    return batch


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(out: Path, mode: str, rows: int, width: int) -> None:
    import torch.distributed as dist

    import wrapcal
    from wrapcal import distributed
    from wrapcal.model import fitting

    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    if mode == "gathered":  # every fit set gathered, whatever the plugins can do
        fitting._shardable = lambda wrapped, name: False
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, CLASSES))
    loader = DataLoader(SyntheticRows(rows, width), batch_size=4096, collate_fn=batch_as_is)
    wrapped = wrapcal.wrap(model, PLUGINS[mode])
    start_mb = peak_mb()
    start = time.perf_counter()
    wrapped.fit(train=loader, progress=False, cache=False)
    seconds = time.perf_counter() - start
    added = peak_mb() - start_mb
    bank_rows = int(wrapped.get_plugin("knn").bank_.shape[0])
    distributed.unshard(wrapped)
    result = {
        "seconds": seconds,
        "added_mb": added,
        "bank_rows": bank_rows,
        "center": wrapped.get_plugin("mahalanobis").center_.tolist(),
        "alpha": float(wrapped.get_plugin("vim").alpha_),
        "clip": float(wrapped.get_plugin("react").clip_),
        "bank_sum": float(wrapped.get_plugin("knn").bank_.double().sum()),
        "all_bank_rows": int(wrapped.get_plugin("knn").bank_.shape[0]),
    }
    everyone = distributed.exchange(result)
    if distributed.rank() == 0:
        out.write_text(json.dumps(everyone))
    if distributed.active():
        dist.destroy_process_group()


def launch(out: Path, mode: str, ranks: int, rows: int, width: int) -> list[dict]:
    args = [str(Path(__file__).resolve()), "--worker", str(out), mode, str(rows), str(width)]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if ranks > 1 else "2", "TQDM_DISABLE": "1"}
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
            f"--master_port={port}", *args,
        ]  # fmt: skip
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * abs(b)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    features_mb = args.rows * args.width * 4 / 2**20
    print(f"{args.rows:,} rows x {args.width} features: {features_mb:.0f} MB in float32")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "one process, every row": launch(Path(tmp, "1"), "one", 1, args.rows, args.width),
            "2 ranks, fit sets gathered": launch(
                Path(tmp, "g"), "gathered", 2, args.rows, args.width
            ),
            "2 ranks, kept sharded": launch(Path(tmp, "s"), "sharded", 2, args.rows, args.width),
        }
    print(f"{'run':<28} {'rank':>4} {'fit s':>7} {'peak MB added':>14} {'bank rows':>10}")
    for name, ranks in runs.items():
        for r, res in enumerate(ranks):
            print(
                f"{name:<28} {r:>4} {res['seconds']:>7.1f} {res['added_mb']:>14.0f} "
                f"{res['bank_rows']:>10,}"
            )
    reference = runs["one process, every row"][0]
    sharded = runs["2 ranks, kept sharded"]
    gathered = runs["2 ranks, fit sets gathered"]
    worst_sharded = max(r["added_mb"] for r in sharded)
    worst_gathered = max(r["added_mb"] for r in gathered)
    print(
        f"peak added per rank: sharded {worst_sharded:.0f} MB vs gathered {worst_gathered:.0f} MB "
        f"({worst_gathered / worst_sharded:.2f}x less); one process {reference['added_mb']:.0f} MB"
    )
    ok = True
    for name, ranks in runs.items():
        for res in ranks:
            same = (
                torch.allclose(
                    torch.tensor(res["center"]), torch.tensor(reference["center"]), rtol=1e-6
                )
                and _close(res["alpha"], reference["alpha"])
                and res["clip"] == reference["clip"]
                and res["all_bank_rows"] == reference["all_bank_rows"]
                and _close(res["bank_sum"], reference["bank_sum"])
            )
            ok &= same
            if not same:
                print(f"MISMATCH: {name} fitted other state than one process")
    print("fitted state: " + ("the same in every run" if ok else "DIFFERS"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
