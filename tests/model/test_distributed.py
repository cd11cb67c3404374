"""torch.distributed: two ranks under torchrun fit and evaluate exactly as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared_data import requires_shared_data

RUN = Path(__file__).parents[1] / "distributed" / "run.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, nproc: int, *extra: str, timeout: int = 900):
    # One intra-op thread in every process: the same arithmetic in one process and two.
    tests = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": path}
    if nproc == 1:
        cmd = [sys.executable, str(RUN), str(out), *extra]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(RUN), str(out), *extra,
        ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def close(a, b, path="") -> None:
    """Numbers within 1e-6 (relative), counts and everything else exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


@pytest.mark.slow
@requires_shared_data
def test_two_ranks_fit_and_evaluate_like_one_process(tmp_path):
    one = launch(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "result.json").read_text())
    sharded = json.loads((tmp_path / "two" / "result.json").read_text())
    assert single["world"] == 1 and sharded["world"] == 2
    close(sharded["models"], single["models"])
    close(sharded["report"], single["report"])
    # Shards of 500 and 501 rows in batches of 100: the ranks ran 5 and 6 batches.
    close(sharded["odd_report"], single["odd_report"])
    close(sharded["odd_report_uncached"], single["odd_report_uncached"])
    # Only the calibration set was gathered for the model whose plugins all fit from
    # shards; the train set stayed on its ranks (it is gathered for the chain model,
    # whose heads train on it).
    assert single["gathered"] == {name: [] for name in single["gathered"]}
    assert sharded["gathered"]["sharded"] == ["calibration"]
    assert "train" in sharded["gathered"]["chain"]
    # The KNN bank was split across the ranks until unshard (then equal, below).
    assert single["bank_rows"] == [1500]
    assert sum(sharded["bank_rows"]) == 1500 and max(sharded["bank_rows"]) < 1000
    assert single["save_before_unshard"] == "saved"
    assert "unshard(wrapped) on every rank" in sharded["save_before_unshard"]
    a = load_file(str(tmp_path / "one" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "two" / "tensors.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@requires_shared_data
def test_a_failing_rank_makes_every_rank_fail_with_its_message(tmp_path):
    failed = launch(tmp_path / "fail", 2, "fail-on-rank-1", timeout=300)
    assert failed.returncode != 0
    assert "rank 1 failed while computing calibration features" in failed.stderr
    assert "labels must be in [0, 10)" in failed.stderr
    assert not (tmp_path / "fail" / "result.json").exists()


@pytest.mark.slow
@requires_shared_data
def test_a_rank_failing_between_collectives_of_a_sharded_fit_fails_every_rank(tmp_path):
    # Rank 1 fails after the first of two all-reduces; rank 0, waiting in the second,
    # must hear of it there (not wait for the backend's timeout of 30 minutes).
    failed = launch(tmp_path / "fail", 2, "fail-after-reduce-on-rank-1", timeout=300)
    assert failed.returncode != 0
    assert "rank 1 failed while fitting plugin" in failed.stderr
    assert "a shard-aware fit failed after its first all-reduce" in failed.stderr
    assert "DistributedError" in failed.stderr  # rank 0's error, naming rank 1's
