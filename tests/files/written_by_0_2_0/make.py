"""Write the .wrapcal files of this folder with the real wrapcal 0.2.0, and their outputs.

How they were made (wrapcal 0.2.0 is commit 4e86c24; the files must never be rewritten
by a later wrapcal, or the test that reads them proves nothing):

    git worktree add /tmp/old 4e86c24
    pip install --no-deps --target /tmp/oldpkg /tmp/old
    cd tests/files/written_by_0_2_0 && PYTHONPATH=/tmp/oldpkg python make.py . 0.2.0
"""

import sys

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

import wrapcal

assert wrapcal.__version__ == sys.argv[2], wrapcal.__version__
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)


def data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 12, generator=gen) + 1.5 * nn.functional.one_hot(y, 12)[:, :12].float() * 2
    return x, y


model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
out = {}
for name, plugins in {
    "calib": [
        "temperature",
        "knn",
        "mahalanobis",
        "vim",
        ("conformal", {"alpha": 0.2}),
        "abstain",
        "histogram_binning",
    ],
    "dropout": [("mc_dropout", {"samples": 4, "p": 0.1}), "temperature"],
    "smooth": [("label_smoothing", {"alpha": 0.05}), "vector_scaling"],
}.items():
    w = wrapcal.wrap(model, plugins).fit(
        train=data(400, 1), calibration=data(300, 2), progress=False
    )
    path = w.save(f"{sys.argv[1]}/{name}.wrapcal")
    p = w.predict(data(50, 3)[0])
    out[f"{name}/probs"] = p.probs.detach().numpy()
    for k, v in p.scores.items():
        out[f"{name}/score/{k}"] = v.detach().numpy()
save_file(model.state_dict(), f"{sys.argv[1]}/model.safetensors")
np.savez(f"{sys.argv[1]}/outputs.npz", **out)
print("wrote", sorted(out))
