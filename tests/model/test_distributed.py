"""torch.distributed: two ranks under torchrun fit and evaluate exactly as one process,
and ranks that disagree (weights, plugins, parameters, data) fail together."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shared_data import requires_shared_data

RUN = Path(__file__).parents[1] / "distributed" / "run.py"
AGREE = Path(__file__).parents[1] / "distributed" / "agree.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, nproc: int, *extra: str, timeout: int = 900, script: Path = RUN):
    # One intra-op thread in every process: the same arithmetic in one process and two.
    tests = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONPATH": path}
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out), *extra]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(script), str(out), *extra,
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


# --- ranks that disagree ------------------------------------------------------------------
# One torchrun of tests/distributed/agree.py (two gloo ranks, a small network, random 8x8
# images; about 10 s) runs every scenario in turn: rank 1 differs in one thing, every
# rank records the error it raised. The ranks stay in step after each refusal (the last
# scenario fits again), and a last, uncaught disagreement ends both processes.


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("agree")
    run = launch(out, 2, timeout=300, script=AGREE)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return results, run


def both_fail(ranks, scenario: str) -> str:
    """The error both ranks raised in ``scenario`` (the same message on each)."""
    (first, second), _ = ranks
    assert "error" in first[scenario], first[scenario]
    assert first[scenario] == second[scenario]
    return first[scenario]["error"]


def test_ranks_with_other_weights_fail_on_every_rank(ranks):
    weights = r"rank 0 = [0-9a-f]{16}; rank 1 = [0-9a-f]{16}\. Fix: load the same checkpoint"
    assert re.fullmatch(
        rf"ranks disagree on the backbone's weights: {weights} on every rank, with the same "
        r"version of the model's code\.",
        both_fail(ranks, "backbone_weights"),
    )
    assert re.match(
        rf"ranks disagree on the head's weights: {weights}", both_fail(ranks, "head_weights")
    )
    # A plugin's learned state (a model fitted before on one rank only).
    assert both_fail(ranks, "fitted_state").startswith(
        "ranks disagree on plugin temperature's learned state: rank 0 = "
    )


def test_ranks_with_other_plugins_or_parameters_fail_on_every_rank(ranks):
    assert both_fail(ranks, "temperature_max_iter").startswith(
        "ranks disagree on plugin temperature's parameter max_iter: rank 0 = 100; rank 1 = 50. "
        "Fix: pass the same parameters to plugin temperature on every rank."
    )
    assert both_fail(ranks, "conformal_alpha").startswith(
        "ranks disagree on plugin conformal's parameter alpha: rank 0 = 0.1; rank 1 = 0.2."
    )
    plugins = both_fail(ranks, "plugins")
    assert plugins.startswith(
        "ranks disagree on the plugins: rank 0 = temperature, conformal; rank 1 = temperature. "
        "Fix: wrap the model with the same plugins"
    )
    assert "They also disagree on plugin conformal's class;" in plugins and "more." in plugins
    assert both_fail(ranks, "seed").startswith(
        "ranks disagree on the seed given to fit: rank 0 = 0; rank 1 = 1."
    )


def test_ranks_with_other_data_fail_on_every_rank(ranks):
    assert both_fail(ranks, "size").startswith(
        "ranks disagree on the size of the calibration set: rank 0 = 200 rows; "
        "rank 1 = 199 rows. Fix: pass the whole calibration set on every rank"
    )
    labels = both_fail(ranks, "labels")
    assert labels.startswith("ranks disagree on the calibration set's labels: rank 0 = 200 ")
    assert re.search(r"rank 1 = 200 labels, 10 classes \(0\.\.9\), digest [0-9a-f]{16}\.", labels)
    classes = both_fail(ranks, "classes")  # another label set: fewer classes
    assert "rank 0 = 200 labels, 10 classes (0..9)" in classes
    assert "rank 1 = 200 labels, 5 classes (0..4)" in classes
    assert both_fail(ranks, "inputs").startswith(
        "ranks disagree on a sample of the calibration set's inputs: rank 0 = 64 of 200 rows "
        "of 3x8x8 float32, digest "
    )
    assert both_fail(ranks, "data_sets").startswith(
        "ranks disagree on the data sets given to fit: rank 0 = calibration=; "
        "rank 1 = train=, calibration=."
    )
    # Only reading tells: a Dataset labelled on rank 0 only (its labels were dropped).
    assert both_fail(ranks, "labelled").startswith(
        "ranks disagree on whether the calibration set is labelled: rank 0 = labelled; "
        "rank 1 = unlabelled. Fix: pass labels on every rank or on none"
    )
    # A DistributedSampler built with rank=0 on every rank: both read the same half.
    assert both_fail(ranks, "sampler").startswith(
        "ranks disagree on the calibration set's DistributedSampler: rank 0 = set for its "
        "rank; rank 1 = num_replicas=2, rank=0 in the process of rank 1 of 2. Fix: create it "
        "after init_process_group without num_replicas and rank"
    )
    # Shards whose rows do not add up to the agreed size.
    assert both_fail(ranks, "rows").startswith(
        "the shards of the odd set hold 4 + 4 = 8 rows, not the 10 rows"
    )


def test_ranks_that_agree_fit_the_same_model_after_refusals(ranks):
    (first, second), _ = ranks
    scenarios = ["agree", "again", "iterable"]
    if "skipped" not in first["hugging_face"]:
        scenarios.append("hugging_face")  # cut into blocks: not read whole by every rank
    for scenario in scenarios:
        a, b = first[scenario], second[scenario]
        assert "error" not in a and "error" not in b, (a, b)
        for key in ("temperature", "state", "plain_state", "operating_points"):
            assert a[key] == b[key], (scenario, key)  # the same model on both ranks
            # Every fit after the refusals, from an IterableDataset that yields each
            # rank's half and from a Hugging Face dataset, fits the first fit's model.
            assert a[key] == first["agree"][key], (scenario, key)
        assert 0 < a["agree_seconds"] < a["fit_seconds"]


def test_evaluate_agreement_refuses_models_or_settings_that_differ(ranks):
    (first, second), _ = ranks
    assert first["evaluate_agree"] == second["evaluate_agree"] == {"agreed": True}
    assert both_fail(ranks, "evaluate_state").startswith(
        "ranks disagree on model 'wrapped': plugin temperature's learned state: rank 0 = "
    )
    assert both_fail(ranks, "evaluate_settings").startswith(
        'ranks disagree on evaluate\'s settings: rank 0 = {"n_bins":15}; rank 1 = {"n_bins":16}.'
    )


def test_an_uncaught_disagreement_ends_every_rank_with_its_message(ranks):
    _, run = ranks
    assert run.returncode != 0
    # Both processes raised it (neither waited for the other until a timeout).
    assert run.stderr.count("DistributedError: ranks disagree on the backbone's weights") == 2
