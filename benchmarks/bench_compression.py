"""Benchmark: the spatial search on the maps' joint channel span against the channels themselves.

    python benchmarks/bench_compression.py [--images 2] [--repeats 3]

Maps of resnet50's shapes at 224 px (``layer2`` 512 x 28 x 28, ``layer3`` 1,024 x 14 x 14,
``layer4`` 2,048 x 7 x 7; random maps with a planted shift and noise, as deep layers look to the
search) are aligned by ``invariance.align`` (default settings, ``rigid``) with
``compress_channels`` on and off, alternating in one process, median of ``--repeats``. The errors
must agree (the identity of docs/definitions.md, "Channel compression"). ``layer2`` has more
positions than channels (1,568 > 512): no compression, the ratio there is the check's overhead.
Written to ``benchmarks/results/channel_compression.{json,md}`` with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import cpu_model, write_results  # noqa: E402  (benchmarks/, the script's own folder)

from invariance import SearchConfig, align  # noqa: E402

SHAPES = {"layer2": (512, 28, 28), "layer3": (1024, 14, 14), "layer4": (2048, 7, 7)}


def maps(c: int, h: int, w: int, b: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.relu(torch.randn(b, c, h, w, generator=g))
    mov = torch.roll(ref, (1, -2), (-2, -1)) + 0.3 * torch.relu(torch.randn(b, c, h, w, generator=g))
    return ref, mov


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load = os.getloadavg()
    on, off = SearchConfig(), replace(SearchConfig(), compress_channels=False)
    rows = {}
    for name, (c, h, w) in SHAPES.items():
        ref, mov = maps(c, h, w, a.images)
        times = {"on": [], "off": []}
        errs = {}
        for r in range(a.repeats):  # ABBA: the first of a pair runs on a colder allocator
            for key, cfg in (("on", on), ("off", off))[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                errs[key] = align(ref, mov, "rigid", config=cfg).errors
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows[name] = {"shape": [a.images, c, h, w], "seconds_compressed": med["on"], "seconds_full": med["off"],
                      "speedup": med["off"] / med["on"],
                      "max_error_difference": float((errs["on"] - errs["off"]).abs().max()),
                      "errors": errs["on"].tolist()}
        print(f"{name}: {med['off']:.2f} s -> {med['on']:.2f} s ({rows[name]['speedup']:.2f}x), "
              f"errors differ by {rows[name]['max_error_difference']:.1e}", flush=True)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
               "platform": platform.platform(), "load_before": load, "load_after": os.getloadavg()}
    out = {"machine": machine, "images": a.images, "repeats": a.repeats, "rows": rows}
    lines = ["# Channel compression: the spatial search on the joint channel span", "",
             f"Command: `python benchmarks/bench_compression.py --images {a.images} --repeats {a.repeats}`. "
             f"Machine: {machine['cpu']}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
             f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after. `align` defaults, `rigid`, float32, "
             "median of the repeats, compressed and full alternating in one process (ABBA order).", "",
             "| maps (resnet50, 224 px) | shape | full s | compressed s | speed-up | max error difference |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {'x'.join(map(str, r['shape'][1:]))} | {r['seconds_full']:.2f} | "
                     f"{r['seconds_compressed']:.2f} | {r['speedup']:.2f}x | {r['max_error_difference']:.1e} |")
    write_results(a.out, "channel_compression", out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
