"""Benchmark: the discrepancy heads (Yu & Aizawa 2019) trained by wrapcal on cached
features beside the same training written as a user loop through the backbone, with
the OOD AUROC and calibration of each.

Model and data (``tests/shared_data.py``): the pretrained CIFAR-10 ResNet-20; labelled
data a random ``--train`` of the CIFAR-10 JPEG training images (seed 0); unlabelled
"traffic" ``--unlabeled`` CIFAR-10 JPEG test images and as many MNIST digits; measured on
``--eval`` other test images and as many other MNIST digits (held out from the traffic),
from cached features. Subsampled so that the user loop runs in a few minutes on 2 cores.

Rows (same process, ``--threads`` torch and BLAS threads, both at the plugin's defaults:
Adam lr 1e-2, margin 2.0, batches of 128, 10 pre-training + 10 fine-tuning epochs; head 1
starts from the model's head, head 2 from a random initialisation):

* ``pretrained``: the model as published; score 1 - max softmax probability (MSP).
* ``wrapcal``: ``wrapcal.wrap(model, [DiscrepancyHeads()]).fit(train=(X, y),
  unlabeled=U, cache=False)``: one backbone pass over each set, then both phases on the
  cached features. ``(heads fit only)`` times the second part alone.
* ``user loop, frozen backbone``: Algorithm 1 of the paper as a user writes it from the
  authors' code (YU1ut/UOOD-MCD), the backbone frozen (``model.linear = Identity``, eval
  mode, no gradients) and run on every mini-batch of images: pre-training (cross-entropy
  of both heads), then per labelled batch paired with an unlabelled one, step A (both
  cross-entropies) and step B (both cross-entropies plus ``max(0, m - mean(H(p1) -
  H(p2)))`` on the unlabelled batch). Score ``sum_k |p1_k - p2_k|``. The authors also
  train the backbone; wrapcal does that only for one block (``train_backbone_block``).

Quality: AUROC of MNIST against CIFAR-10 test (held out) by the score; accuracy, 15-bin
ECE and NLL of the prediction (the mean of the two heads' softmax) on the CIFAR-10 test
images. Agreement checks (the two trainings solve the same problem from different
random draws): AUROC within ``AUROC_TOL``, accuracy within ``ACC_TOL``, ECE within
``ECE_TOL``.

Run: ``python benchmarks/bench_discrepancy.py [--train 1000] [--unlabeled 500] [--eval
2000] [--threads 1]``. Needs ``../shared/data``. Exits with status 1 when an agreement
check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from _timing import Checks, import_shared_data, machine_line, threads, timed
from torch import nn

import wrapcal
from wrapcal import metrics
from wrapcal_plugins.ood.discrepancy import DiscrepancyHeads

AUROC_TOL = 0.02
ACC_TOL = 0.02
ECE_TOL = 0.02


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def user_loop(
    model: nn.Module,
    labelled: tuple[torch.Tensor, torch.Tensor],
    unlabelled: torch.Tensor,
    plugin: DiscrepancyHeads,
) -> tuple[nn.Module, nn.Module]:
    """The two heads trained by the paper's Algorithm 1, images through the frozen backbone."""
    backbone = copy.deepcopy(model).eval()
    h1 = backbone.linear  # the model's own head
    backbone.linear = nn.Identity()
    for p in backbone.parameters():
        p.requires_grad_(False)
    h1.requires_grad_(True)
    torch.manual_seed(0)
    h2 = nn.Linear(h1.in_features, h1.out_features)  # PyTorch's default random init
    x, y = labelled
    bs, g = plugin.batch_size, torch.Generator().manual_seed(0)

    def ce(f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(h1(f), labels) + F.cross_entropy(h2(f), labels)

    opt = torch.optim.Adam([*h1.parameters(), *h2.parameters()], lr=plugin.lr)
    for _ in range(plugin.epochs_pretrain):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = order[i : i + bs]
            loss = ce(backbone(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    opt = torch.optim.Adam([*h1.parameters(), *h2.parameters()], lr=plugin.lr)
    u_order, u_pos = torch.randperm(len(unlabelled), generator=g), 0
    for _ in range(plugin.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = order[i : i + bs]
            if u_pos >= len(unlabelled):  # cycle the unlabelled data
                u_order, u_pos = torch.randperm(len(unlabelled), generator=g), 0
            u_idx = u_order[u_pos : u_pos + bs]
            u_pos += bs
            f, fu = backbone(x[idx]), backbone(unlabelled[u_idx])
            loss_a = ce(f, y[idx])  # step A
            opt.zero_grad()
            loss_a.backward()
            opt.step()
            gap = (entropy(h1(fu)) - entropy(h2(fu))).mean()
            loss_b = ce(f, y[idx]) + F.relu(plugin.margin - gap)  # step B
            opt.zero_grad()
            loss_b.backward()
            opt.step()
    return h1.eval(), h2.eval()


def quality(
    members: list[torch.Tensor], n_id: int, labels: torch.Tensor, score: torch.Tensor | None
) -> dict[str, float]:
    """Prediction (mean of the members' softmax) on the ID rows; AUROC of the OOD rows."""
    probs = torch.stack([m.double().softmax(-1) for m in members]).mean(0)
    if score is None:
        score = -probs.amax(-1)
    return {
        "auroc": metrics.auroc(score[:n_id], score[n_id:]),
        "acc": metrics.accuracy(probs[:n_id], labels),
        "ece": metrics.ece(probs[:n_id], labels),
        "nll": metrics.nll(probs[:n_id], labels),
    }


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.softmax(-1) - b.softmax(-1)).abs().sum(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="labelled training images")
    parser.add_argument("--unlabeled", type=int, default=500, help="CIFAR and MNIST, each")
    parser.add_argument("--eval", type=int, default=2000, help="held-out CIFAR and MNIST, each")
    parser.add_argument("--epochs", type=int, default=10, help="pre-training and fine-tuning")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and BLAS threads (0: as they are)"
    )
    args = parser.parse_args(argv)
    with threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    """The benchmark itself, under ``main``'s thread settings; the exit status."""
    sd = import_shared_data()
    if not sd.HAVE_SHARED_DATA:
        print(f"needs the shared data ({sd.SHARED_DATA}); nothing to measure")
        return 0
    u, n_eval = args.unlabeled, args.eval

    cached = sd.resnet20_outputs()
    x_all, y_all = sd.cifar10("train")
    pick = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))[: args.train]
    x, y = x_all[pick], y_all[pick]
    x_test, y_test = sd.cifar10("test")
    c_order = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(0))
    m_order = torch.randperm(10000, generator=torch.Generator().manual_seed(1))
    unlabelled = torch.cat([x_test[c_order[:u]], sd.mnist_ood()[m_order[:u]]])
    c_eval, m_eval = c_order[u : u + n_eval], m_order[u : u + n_eval]
    eval_features = torch.cat([cached["test_features"][c_eval], cached["mnist_features"][m_eval]])
    y_eval = y_test[c_eval]
    model = sd.pretrained_resnet20()
    plugin = DiscrepancyHeads(epochs_pretrain=args.epochs, epochs=args.epochs, progress=False)

    print(
        f"pretrained ResNet-20; labelled {args.train} CIFAR-10 JPEG train images; unlabelled "
        f"{u} CIFAR-10 test + {u} MNIST; measured on {n_eval} + {n_eval} held-out images"
    )
    print(f"{machine_line()}; {args.epochs} + {args.epochs} epochs")
    rows: dict[str, dict[str, float]] = {}
    times: dict[str, float] = {}
    passes: dict[str, str] = {}
    with torch.no_grad():
        rows["pretrained (MSP)"] = quality([model.linear(eval_features)], n_eval, y_eval, None)
    times["pretrained (MSP)"], passes["pretrained (MSP)"] = float("nan"), "-"

    def fit_wrapcal() -> wrapcal.WrappedModel:
        wrapped = wrapcal.wrap(model, [copy.deepcopy(plugin)])
        return wrapped.fit(train=(x, y), unlabeled=unlabelled, cache=False, progress=False)

    # Warm-up of both code paths on a few images (first calls pay one-off set-up costs).
    few, tiny = torch.arange(64), copy.deepcopy(plugin)
    tiny.epochs_pretrain = tiny.epochs = 1
    wrapcal.wrap(model, [tiny]).fit(
        train=(x[few], y[few]), unlabeled=unlabelled[few], cache=False, progress=False
    )
    user_loop(model, (x[few], y[few]), unlabelled[few], tiny)

    ours, times["wrapcal"] = timed(fit_wrapcal)
    passes["wrapcal"] = "1 per set"
    with torch.no_grad():
        members = ours.head_members(eval_features)
        pred = ours.predict_features(eval_features)
    rows["wrapcal"] = quality(list(members), n_eval, y_eval, pred.scores["discrepancy"])
    heads_only = wrapcal.wrap(model, [copy.deepcopy(plugin)])
    train_features = cached["train_features"][pick]
    u_features = torch.cat(
        [cached["test_features"][c_order[:u]], cached["mnist_features"][m_order[:u]]]
    )
    _, times["  (heads fit only)"] = timed(
        lambda: heads_only.fit_features(
            train=(train_features, y), unlabeled=u_features, progress=False
        )
    )

    name = "user loop, frozen backbone"
    (h1, h2), times[name] = timed(lambda: user_loop(model, (x, y), unlabelled, plugin))
    steps = -(-args.train // plugin.batch_size)
    passes[name] = f"{args.epochs} + {args.epochs} x 2"
    with torch.no_grad():
        a, b = h1(eval_features), h2(eval_features)
    rows[name] = quality([a, b], n_eval, y_eval, l1(a, b))

    unit = times["wrapcal"]
    print(f"ratio = time / wrapcal's fit; {steps} labelled batches of {plugin.batch_size} an epoch")
    print(
        f"  {'method':<28} {'time':>8} {'ratio':>7}  {'backbone passes':<16} {'AUROC':>7} "
        f"{'acc':>6} {'ECE':>6} {'NLL':>6}"
    )
    for key, t in times.items():
        q = rows.get(key)
        timing = "      -         -" if t != t else f"{t:7.2f}s {t / unit:6.2f}x"
        figures = ""
        if q:
            figures = f"{100 * q['auroc']:6.2f}% {100 * q['acc']:5.1f}% {100 * q['ece']:5.2f}% "
            figures += f"{q['nll']:6.3f}"
        print(f"  {key:<28} {timing}  {passes.get(key, ''):<16} {figures}")

    checks = Checks()
    for key, tol in (("auroc", AUROC_TOL), ("acc", ACC_TOL), ("ece", ECE_TOL)):
        gap = abs(rows["wrapcal"][key] - rows[name][key])
        checks.check(f"{key}: wrapcal vs the user loop", gap <= tol, f"|diff| {gap:.4f} <= {tol}")
    return checks.report()


if __name__ == "__main__":
    sys.exit(main())
