"""Benchmark: the cost of checking a disk-cache entry's digests on a hit, beside reading
its features once (what every plugin fit does), in the same process, page cache warm.

A hit verifies the SHA-256 digest of every ~8 MiB chunk of ``features.bin`` (and of the
labels) before serving the entry (``wrapcal.features.disk_arrays.verify_entry``), so a
tampered entry is rebuilt, never served. The baseline is reading every row once in the
chunks ``FeatureSet.batches`` uses. Medians of 15 runs.

Run: ``python benchmarks/bench_cache_verify.py [ROWS WIDTH ...]`` (default 20000 512 and
100000 512).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from _timing import median_seconds

from wrapcal.features.disk_arrays import DiskFeatures, DiskWriter, verify_entry


def measure(rows: int, width: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "entry"
        writer = DiskWriter(folder, "float32")
        x = torch.randn(rows, width)
        for s in range(0, rows, 4096):
            writer.append(x[s : s + 4096], torch.zeros(min(4096, rows - s), dtype=torch.long))
        meta = writer.finish({})
        disk = DiskFeatures(folder / "features.bin", rows, width)

        def read_all() -> None:
            for s in range(0, rows, 65536):
                disk[s : s + 65536]

        def check() -> None:
            assert verify_entry(folder, meta) is None

        plain, checked = median_seconds(read_all, 15), median_seconds(check, 15)
        mib = rows * width * 4 / 2**20
        print(
            f"| {rows} x {width} float32 ({mib:.0f} MiB) | {1000 * plain:.1f} | "
            f"{1000 * checked:.1f} | {checked / plain:.2f} |"
        )


def main(argv: list[str]) -> int:
    sizes = [(int(a), int(b)) for a, b in zip(argv[::2], argv[1::2], strict=False)]
    print("| entry | read every row (ms) | check the digests (ms) | check / read |")
    print("| --- | ---: | ---: | ---: |")
    for rows, width in sizes or [(20000, 512), (100000, 512)]:
        measure(rows, width)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
