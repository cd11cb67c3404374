"""Benchmark: the exported model in ONNX Runtime beside ``wrapped.predict``, batch 1 and 64.

Models: the shared pretrained CIFAR-10 ResNet-20 and timm's resnet18 (random weights,
seed 0, 10 classes, 32 x 32 inputs), each wrapped with a serving set of plugins:
``temperature``, ``mc_dropout`` (T = 30, head), ``knn`` (k = 50, a bank of 5000
training features), ``conformal`` (APS) and ``abstain``, fitted from cached features of
real CIFAR-10 images; timed on CIFAR-10 test images.

Rows (same process, same images, interleaved rounds; best of ``--repeats``):

* ``predict``: ``wrapped.predict(x)`` in PyTorch (eager; it checks the inputs, as served
  Python code would keep doing);
* ``predict, checks off``: the same with ``wrapped.check_inputs = False``;
* ``torch.export``: ``program.module()(x)`` of the ``.pt2`` (``format="torch"``);
* ``onnxruntime``: ``session.run`` of the ``.onnx``, with as many intra-op threads as
  torch has (``--threads``), not spinning when idle (so the rows timed between its runs
  get the CPU).

The ratio is predict's time over each row's. Agreement check: every ONNX Runtime output
equals predict's to ``1e-5 + 1e-5 |predict|`` (integers and booleans exactly), and the
``torch.export`` program's outputs are predict's bit for bit.

Run: ``python benchmarks/bench_export.py [--threads 1] [--repeats 20]``. Needs
``../shared/data``, onnxruntime and onnxscript. Exits with status 1 when a check fails.
One thread by default: on a shared machine, PyTorch's OpenMP threads wait for one
another whenever another process takes a core, and single-image rows then measure the
scheduler (ResNet-20 at batch 1 took 450 ms with 2 threads, 4.8 ms with 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from _timing import Checks, best_times, import_shared_data, machine_line, timed

import wrapcal
from wrapcal.export import export
from wrapcal.export.module import prediction_outputs

PLUGINS = [
    ("temperature", {}),
    ("mc_dropout", {"samples": 30}),
    ("knn", {"k": 50}),
    ("conformal", {"method": "aps"}),
    ("abstain", {"risk": 0.1}),
]
BANK, CALIBRATION = 5000, 2000
TOL = 1e-5


def models(data) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Each model with its fit sets: cached features of real images."""
    import timm

    order = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))
    train_x, train_y = data.cifar10("train")
    test_x, test_y = data.cifar10("test")
    out = data.resnet20_outputs()
    found = {
        "ResNet-20": (
            data.pretrained_resnet20(),
            {
                "train": (out["train_features"][order[:BANK]], out["train_labels"][order[:BANK]]),
                "calibration": (
                    out["test_features"][order[:CALIBRATION]],
                    out["test_labels"][order[:CALIBRATION]],
                ),
            },
        )
    }
    torch.manual_seed(0)
    resnet18 = timm.create_model("resnet18", num_classes=10).eval()
    backbone = wrapcal.wrap(resnet18, []).backbone
    with torch.no_grad():
        train = torch.cat([backbone(train_x[order[i : i + 500]]) for i in range(0, BANK, 500)])
        held = backbone(test_x[order[:CALIBRATION]])
    found["timm resnet18"] = (
        resnet18,
        {
            "train": (train, train_y[order[:BANK]]),
            "calibration": (held, test_y[order[:CALIBRATION]]),
        },
    )
    return found


def agree(got: list[np.ndarray], expected: dict[str, torch.Tensor]) -> tuple[bool, float]:
    ok, worst = True, 0.0
    for have, (_, value) in zip(got, expected.items(), strict=True):
        want = value.numpy()
        if want.dtype.kind == "f":
            diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
            ok &= bool((diff <= TOL + TOL * np.abs(want.astype(np.float64))).all())
            worst = max(worst, float(diff.max()))
        else:
            ok &= bool(np.array_equal(have, want))
    return ok, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import onnxruntime as ort

    data = import_shared_data()
    checks = Checks()
    test_x = data.cifar10("test")[0][torch.arange(5000, 5064)]
    print(f"bench_export: {machine_line()}, onnxruntime {ort.__version__}")
    print(f"plugins: {', '.join(name for name, _ in PLUGINS)}")
    header = f"{'model':<14} {'batch':>5}  {'row':<22} {'ms':>9} {'predict / row':>14}"
    print(header)
    print("-" * len(header))
    workdir = Path(tempfile.mkdtemp(prefix="bench_export-"))
    for model_name, (model, sets) in models(data).items():
        wrapped = wrapcal.wrap(model, PLUGINS)
        wrapped.fit_features(**sets, progress=False)
        wrapped.input_shape = (3, 32, 32)
        onnx_path, seconds = timed(lambda w=wrapped: export(w, workdir / "m.onnx"))
        pt2_path, pt2_seconds = timed(lambda w=wrapped: export(w, workdir / "m.pt2", "torch"))
        print(f"{model_name}: export {seconds:.1f} s (ONNX), {pt2_seconds:.1f} s (.pt2)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        # Idle ONNX Runtime threads spin by default, taking the CPU from the torch rows
        # timed between its runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(onnx_path), options)
        program = torch.export.load(str(pt2_path)).module()
        for batch in (1, 64):
            x = test_x[:batch]
            feed = {"input": x.numpy()}
            expected = prediction_outputs(wrapped.predict(x))
            ok, worst = agree(session.run(None, feed), expected)
            checks.check(
                f"{model_name} batch {batch}: onnxruntime = predict",
                ok,
                f"max |ort - predict| {worst:.2e} (tolerance {TOL} + {TOL} |predict|)",
            )
            with torch.no_grad():
                exported = program(x)
            same = all(torch.equal(a, b) for a, b in zip(exported, expected.values(), strict=True))
            checks.check(f"{model_name} batch {batch}: torch.export = predict", same, "bitwise")

            def predict_unchecked(w=wrapped, x=x):
                w.check_inputs = False
                try:
                    return w.predict(x)
                finally:
                    w.check_inputs = True

            def run_program(program=program, x=x):
                with torch.no_grad():
                    return program(x)

            times = best_times(
                {
                    "predict": lambda w=wrapped, x=x: w.predict(x),
                    "predict, checks off": predict_unchecked,
                    "torch.export": run_program,
                    "onnxruntime": lambda s=session, feed=feed: s.run(None, feed),
                },
                args.repeats,
            )
            base = times["predict"]
            for row, t in times.items():
                print(f"{model_name:<14} {batch:>5}  {row:<22} {t * 1e3:>9.2f} {base / t:>13.2f}x")
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
