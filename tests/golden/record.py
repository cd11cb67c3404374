"""Record the outputs of every built-in plugin and combination on the shared ResNet-20.

Run once, before a change that must not move them (the plugin contract v2 rewrite):
``PYTHONPATH=tests python -m golden.record`` writes ``tests/golden/resnet20_outputs.npz``, which
``tests/test_golden_outputs.py`` compares against, bit for bit. The configurations and
the data protocol are in ``tests/golden/configs.py``, shared by both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from golden.configs import CONFIGS, golden_data, run_config

HERE = Path(__file__).resolve().parent


def main() -> None:
    data = golden_data()
    arrays: dict[str, np.ndarray] = {}
    for name, spec in CONFIGS.items():
        print(f"recording {name}", flush=True)
        for key, value in run_config(spec, data).items():
            arrays[f"{name}/{key}"] = value
    out = HERE / "resnet20_outputs.npz"
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
