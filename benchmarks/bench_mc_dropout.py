"""Benchmark: MC dropout on the head (one backbone pass) beside whole-network MC dropout.

Model: the shared pretrained CIFAR-10 ResNet-20 (``tests/shared_data.py``) given dropout
modules, so that every method has real dropout to sample:

* A, dropout at the head (``linear = Sequential(Dropout(p), Linear)``, as torchvision's
  classifiers and timm's ``drop_rate`` have it). The head is first fine-tuned with that
  dropout (wrapcal ``MCDropout(finetune=True)``, 5 epochs of Adam on the 10000 cached
  CIFAR-10 training features), so the model is one trained with its dropout. Every row
  below uses that model.
* B (``--body-p`` > 0), dropout throughout: also ``Dropout(body_p)`` after each of the
  three stages. The backbone was not trained with it: this part shows what sampling a
  backbone's dropout costs and buys, not a tuned model.

Rows (same images, same process, ``--threads`` torch and BLAS threads):

* ``bare model``: one deterministic pass (eval mode): the MSP baseline.
* ``wrapcal head``: ``wrapcal.wrap(model, [MCDropout(samples=T)]).predict(x)``: the
  backbone once, then T samples of the head's dropout on the features in one call.
* ``user loop``: what a user writes: ``model.eval()``, the dropout modules put back in
  train mode, T full forward passes, softmax averaged.
* ``torch-uncertainty``: ``torch_uncertainty.methods.mc_dropout(model, T,
  on_batch=True)`` in eval mode (T copies of the batch through the whole network).
* ``wrapcal all`` (part B): ``MCDropout(samples=T, scope="all")``: T full passes with
  every dropout module sampled (batched, seeded masks).

Quality (every row): accuracy, 15-bin ECE and NLL of the predictive mean on a random
``--n`` CIFAR-10 JPEG test images, and AUROC of MNIST (``--n`` digits) against them with
the predictive entropy and the mutual information (epistemic part) as the score.

Agreement checks. Part A: (1) wrapcal's head members equal ``head(features * mask_t)``
for its T masks on one backbone pass (exactly what a hand-written head loop gives);
(2) every estimate's mean confidence over the images equals that of the exact
predictive mean (wrapcal's head with ``REFERENCE_T`` samples) within its Monte Carlo
error, ``|z| <= Z_MAX`` (the bare model, which samples nothing, is printed for
contrast), and its accuracy is wrapcal head's within ``ACC_TOL``. Part B: wrapcal's
``scope="all"`` and the user loop, which sample the same network, agree the same way
(``|z| <= Z_MAX`` between them, accuracy within ``ACC_TOL``).

Run: ``python benchmarks/bench_mc_dropout.py [--n 500] [--samples 20] [--p 0.2]
[--body-p 0.05] [--threads 1] [--skip torch-uncertainty]``. Needs ``../shared/data``.
Exits with status 1 when an agreement check fails.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable

import torch
from _timing import Checks, import_shared_data, machine_line, threads, timed
from torch import nn

import wrapcal
from wrapcal import metrics
from wrapcal_plugins.sampling.mc_dropout import MCDropout

#: Samples of the exact predictive mean part A's estimates are compared with (head only).
REFERENCE_T = 2000
#: Largest |z| of a mean-confidence gap allowed between two estimates of the same mean.
Z_MAX = 4.0
#: Largest accuracy gap between two estimates (at least 4 images of the ``--n``).
ACC_TOL = 0.02
#: Fine-tuning of the head with its dropout, on the cached training features.
FINETUNE_EPOCHS = 5


def with_dropout(model: nn.Module, p_head: float, p_body: float) -> nn.Module:
    """The ResNet-20 with ``Dropout(p_head)`` before its head and ``Dropout(p_body)``
    after each stage (none when 0)."""
    if p_body > 0:
        for name in ("layer1", "layer2", "layer3"):
            setattr(model, name, nn.Sequential(getattr(model, name), nn.Dropout(p_body)))
    model.linear = nn.Sequential(nn.Dropout(p_head), model.linear)
    return model.eval()


def summarise(member_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """What ``predict`` gives, from member probabilities ``[T, N, K]``: the predictive
    mean, its entropy, the mutual information and ``std_top_prob`` (the spread over the
    samples of the probability of the predicted class)."""
    mean = member_probs.mean(dim=0)
    ent = -(mean * mean.clamp_min(1e-30).log()).sum(-1)
    expected = -(member_probs * member_probs.clamp_min(1e-30).log()).sum(-1).mean(0)
    top = member_probs.gather(-1, mean.argmax(-1)[None, :, None].expand(len(member_probs), -1, 1))
    return {
        "probs": mean,
        "predictive_entropy": ent,
        "mutual_information": ent - expected,
        "std_top_prob": top.squeeze(-1).std(dim=0, correction=0),
    }


def confidence_z(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], se_a: float, se_b: float
) -> float:
    """z of the difference of the mean confidences of two estimates with those errors."""
    diff = float(a["probs"].amax(-1).double().mean() - b["probs"].amax(-1).double().mean())
    return diff / max((se_a**2 + se_b**2) ** 0.5, 1e-12)


def mean_se(out: dict[str, torch.Tensor], samples: int, independent: bool) -> float:
    """Monte Carlo standard error of the mean confidence over the images.

    Per image it is ``std_top_prob / sqrt(T)``. Masks drawn independently for every
    image (the user loop, torch-uncertainty, ``scope="all"``) give independent errors,
    which average down over the ``N`` images; wrapcal's head masks are shared by all
    images, so there the bound for fully correlated errors is taken.
    """
    var = out["std_top_prob"].double().pow(2) / samples
    if independent:
        return float(var.sum().sqrt() / len(var))
    return float(var.mean().sqrt())


def quality(out: dict[str, torch.Tensor], labels: torch.Tensor, n_id: int) -> dict[str, float]:
    """Accuracy, ECE, NLL on the ID rows; AUROC of the OOD rows with both scores."""
    probs = out["probs"][:n_id].double()
    row = {
        "acc": metrics.accuracy(probs, labels),
        "ece": metrics.ece(probs, labels),
        "nll": metrics.nll(probs, labels),
    }
    for key, short in (("predictive_entropy", "auroc_pe"), ("mutual_information", "auroc_mi")):
        if key in out:
            row[short] = metrics.auroc(out[key][:n_id], out[key][n_id:])
    return row


def dropout_on(model: nn.Module) -> list[nn.Module]:
    """Put the dropout modules of an eval-mode model in train mode (the user's recipe)."""
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    for m in drops:
        m.train()
    return drops


def user_loop(model: nn.Module, x: torch.Tensor, samples: int, batch: int) -> torch.Tensor:
    """T full passes with the dropout modules sampling: member probs ``[T, N, K]``."""
    model.eval()
    drops = dropout_on(model)
    try:
        with torch.no_grad():
            parts = [
                torch.stack([model(x[i : i + batch]).softmax(-1) for _ in range(samples)])
                for i in range(0, len(x), batch)
            ]
    finally:
        for m in drops:
            m.eval()
    return torch.cat(parts, dim=1)


def tu_runner(
    model: nn.Module, samples: int, batch: int
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torch-uncertainty's MC-dropout wrapper, or None when it is not installed."""
    try:
        from torch_uncertainty.methods import mc_dropout
    except ImportError as e:
        print(f"  note: torch-uncertainty left out: {e}")
        return None

    def run(x: torch.Tensor) -> torch.Tensor:
        wrapper = mc_dropout(model, num_estimators=samples, on_batch=True).eval()
        parts = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xb = x[i : i + batch]
                parts.append(wrapper(xb).softmax(-1).reshape(samples, len(xb), -1))
        model.eval()  # the wrapper left the dropout modules in train mode
        return torch.cat(parts, dim=1)

    return run


def wrapcal_run(wrapped: nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = wrapped.predict(x)
        return {"probs": pred.probs, **pred.scores}

    return run


def print_rows(rows: dict[str, dict[str, float]], times: dict[str, float], unit: str) -> None:
    print(
        f"  {'method':<22} {'time':>9} {'ratio':>7}   {'acc':>6} {'ECE':>6} {'NLL':>6} "
        f"{'AUROC(PE)':>9} {'AUROC(MI)':>9}"
    )
    for name, q in rows.items():
        mi = f"{100 * q['auroc_mi']:8.2f}%" if "auroc_mi" in q else f"{'-':>9}"
        print(
            f"  {name:<22} {times[name]:8.2f}s {times[name] / times[unit]:6.1f}x   "
            f"{100 * q['acc']:5.1f}% {100 * q['ece']:5.2f}% {q['nll']:6.3f} "
            f"{100 * q['auroc_pe']:8.2f}% {mi}"
        )


def mean_tv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean total-variation distance between the rows of two probability tables."""
    return float(0.5 * (a.double() - b.double()).abs().sum(-1).mean())


def measure(
    runs: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]],
    x: torch.Tensor,
    done: dict[str, tuple[dict[str, torch.Tensor], float]] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """Outputs and wall time of each run on ``x`` (one warm-up call on 8 images each);
    runs already in ``done`` are taken from there."""
    outs, times = {}, {}
    for name, run in runs.items():
        if done and name in done:
            outs[name], times[name] = done[name]
            continue
        run(x[:8])
        outs[name], times[name] = timed(lambda run=run: run(x))
    return outs, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="CIFAR-10 test and MNIST images each")
    parser.add_argument("--samples", type=int, default=20, help="T, dropout samples")
    parser.add_argument("--p", type=float, default=0.2, help="head dropout rate")
    parser.add_argument("--body-p", type=float, default=0.05, help="part B rate (0: skip B)")
    parser.add_argument("--batch", type=int, default=250, help="images per forward call")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (0: as they are)"
    )
    parser.add_argument("--skip", default="", help="peers to leave out: torch-uncertainty")
    args = parser.parse_args(argv)
    with threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    """The benchmark itself, under ``main``'s thread settings; the exit status."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    sd = import_shared_data()
    if not sd.HAVE_SHARED_DATA:
        print(f"needs the shared data ({sd.SHARED_DATA}); nothing to measure")
        return 0
    T, n, batch = args.samples, args.n, args.batch
    acc_tol = max(ACC_TOL, 4 / n)

    images, labels = sd.cifar10("test")
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n]
    x = torch.cat([images[pick], sd.mnist_ood(n)])
    y = labels[pick]
    cached = sd.resnet20_outputs()
    print(
        f"pretrained ResNet-20 with dropout; {n} CIFAR-10 JPEG test images (random, seed 0) "
        f"+ {n} MNIST digits; T = {T}; {batch} images per forward call"
    )
    print(machine_line())
    checks = Checks()

    # --- part A: dropout at the head ---------------------------------------------------
    model = with_dropout(sd.pretrained_resnet20(), args.p, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tuner = wrapcal.wrap(model, [MCDropout(p=args.p, finetune=True, epochs=FINETUNE_EPOCHS)])
        tuner.fit_features(train=(cached["train_features"], cached["train_labels"]), progress=False)
    model.linear[1].load_state_dict(tuner.head.state_dict())  # the model, trained with dropout
    wrapped = wrapcal.wrap(model, [MCDropout(samples=T)]).eval()
    plugin = wrapped.get_plugin(MCDropout)
    print(
        f"\nA. dropout p={args.p} before the head (head fine-tuned with it, "
        f"{FINETUNE_EPOCHS} epochs on the cached train features)"
    )

    def bare(xx: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = torch.cat([model(xx[i : i + batch]) for i in range(0, len(xx), batch)])
        out = summarise(logits.softmax(-1)[None])
        del out["mutual_information"]  # zero for one deterministic member: no score
        return out

    runs: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
        "bare model (1 pass)": bare,
        "wrapcal head": wrapcal_run(wrapped),
        "user loop (T passes)": lambda xx: summarise(user_loop(model, xx, T, batch)),
    }
    tu = None if "torch-uncertainty" in args.skip else tu_runner(model, T, max(1, batch // 2))
    if tu is not None:
        runs["torch-uncertainty"] = lambda xx: summarise(tu(xx))
    outs, times = measure(runs, x)
    rows = {name: quality(out, y, n) for name, out in outs.items()}
    print_rows(rows, times, "bare model (1 pass)")
    head_ratio = times["wrapcal head"] / times["bare model (1 pass)"]
    loop_ratio = times["user loop (T passes)"] / times["wrapcal head"]
    print(f"  wrapcal head: {head_ratio:.2f}x one pass; the user loop takes {loop_ratio:.1f}x it")

    # (1) the head samples are T masked copies of the head on one backbone pass.
    with torch.no_grad():
        feats = wrapped.backbone(x[:64])
        masks = plugin.feature_masks(feats.shape[-1])
        by_hand = torch.stack([wrapped.head(feats * m) for m in masks])
        members = wrapped.head_members(feats)
    diff = float((members - by_hand).abs().max())
    checks.check(
        "wrapcal head = T masked heads on one pass", diff <= 1e-5, f"max |diff| {diff:.1e}"
    )
    # (2) each estimate's mean confidence is the exact predictive mean's, within its MC error.
    with torch.no_grad():
        exact_model = wrapcal.wrap(model, [MCDropout(samples=REFERENCE_T, p=args.p, seed=1)])
        pred = exact_model.predict_features(wrapped.backbone(x))
    exact = {"probs": pred.probs, "std_top_prob": pred.scores["std_top_prob"]}
    se_exact = mean_se(exact, REFERENCE_T, independent=False)
    print(
        f"  mean confidence vs the exact predictive mean (head, T={REFERENCE_T}), z = gap / "
        "MC standard error; mean TV distance to it:"
    )
    for name, out in outs.items():
        bare_row = name.startswith("bare")
        se = 0.0 if bare_row else mean_se(out, T, independent=name != "wrapcal head")
        z = confidence_z(out, exact, se, se_exact)
        tv = mean_tv(out["probs"], exact["probs"])
        print(f"    {name:<22} z {z:+7.2f}   TV {tv:.4f}")
        if bare_row:
            continue
        checks.check(
            f"{name}: mean confidence = the exact predictive mean's",
            abs(z) <= Z_MAX,
            f"|z| {abs(z):.2f} <= {Z_MAX}",
        )
        if name != "wrapcal head":
            gap = abs(rows[name]["acc"] - rows["wrapcal head"]["acc"])
            checks.check(
                f"{name}: accuracy as wrapcal head's",
                gap <= acc_tol,
                f"|diff| {gap:.3f} <= {acc_tol:.3f}",
            )

    # --- part B: dropout throughout -------------------------------------------------------
    if args.body_p > 0:
        body = with_dropout(sd.pretrained_resnet20(), args.p, args.body_p)
        body.linear[1].load_state_dict(tuner.head.state_dict())
        print(
            f"\nB. also dropout p={args.body_p} after each stage (backbone not trained with it); "
            "same fine-tuned head"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            all_scope = wrapcal.wrap(body, [MCDropout(samples=T, scope="all")]).eval()
        runs_b: dict[str, Callable[[torch.Tensor], dict[str, torch.Tensor]]] = {
            "bare model (1 pass)": bare,
            "wrapcal head": wrapcal_run(wrapped),
            "wrapcal all": wrapcal_run(all_scope),
            "user loop (T passes)": lambda xx: summarise(user_loop(body, xx, T, batch)),
        }
        reuse = {k: (outs[k], times[k]) for k in ("bare model (1 pass)", "wrapcal head")}
        outs_b, times_b = measure(runs_b, x, reuse)
        rows_b = {name: quality(out, y, n) for name, out in outs_b.items()}
        print("  (bare model and wrapcal head: part A's; they never sample the stages' dropout)")
        print_rows(rows_b, times_b, "bare model (1 pass)")
        ours, theirs = outs_b["wrapcal all"], outs_b["user loop (T passes)"]
        se_ours, se_theirs = mean_se(ours, T, True), mean_se(theirs, T, True)
        z = confidence_z(ours, theirs, se_ours, se_theirs)
        z_head = confidence_z(
            outs["wrapcal head"], theirs, mean_se(outs["wrapcal head"], T, False), se_theirs
        )
        checks.check(
            "wrapcal all vs user loop: mean confidence",
            abs(z) <= Z_MAX,
            f"|z| {abs(z):.2f} <= {Z_MAX} (wrapcal head vs user loop: z {z_head:+.1f}); "
            f"mean TV {mean_tv(ours['probs'], theirs['probs']):.4f}",
        )
        gap = abs(rows_b["wrapcal all"]["acc"] - rows_b["user loop (T passes)"]["acc"])
        checks.check(
            "wrapcal all vs user loop: accuracy",
            gap <= acc_tol,
            f"|diff| {gap:.3f} <= {acc_tol:.3f}",
        )
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
