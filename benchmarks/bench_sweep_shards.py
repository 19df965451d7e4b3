"""A large image set in shards gives the record of one call: 1,000 images as 1 task and as 4 shards.

Plans the same spec twice (``shards = 1`` and ``shards = 4``), runs both with the local executor,
and compares every value of the two ``results.parquet`` tables (means, intervals, floors, nulls,
per-image lists). Writes ``benchmarks/results/sweep_shards.{json,md}``.

    python benchmarks/bench_sweep_shards.py [--images 1000] [--shards 4]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from _machine import cpu_model, write_results

from invariance import sweep

SPEC = """
[options]
transformations = ["rotation:45"]
channels = ["spatial"]
n_boot = 1000
quick = true

[[models]]
name = "mnist-cnn-float64"
model = "{model}"
layers = ["conv1"]

[[images]]
name = "glyphs"
source = "glyphs"
n = {n}
size = 28
shards = {shards}
"""


def _run(tmp: Path, n: int, shards: int) -> tuple[list[dict], float]:
    spec = tmp / f"spec{shards}.toml"
    model = tmp / "float64.py"  # float64: a record that does not depend on the batch an image is in
    model.write_text("import invariance\n\n\ndef mnist_cnn():\n    return invariance.pretrained_mnist_cnn().double()\n")
    spec.write_text(SPEC.format(n=n, shards=shards, model=f"{model}:mnist_cnn"))
    folder = tmp / f"sweep{shards}"
    sweep.plan(spec, folder)
    t0 = time.perf_counter()
    st = sweep.run(folder, "local", progress=True)
    seconds = time.perf_counter() - t0
    assert not st.failed and not st.pending, str(st)
    sweep.report(folder, figures=False)
    return pq.read_table(folder / "results.parquet").to_pylist(), seconds


def max_difference(a: list[dict], b: list[dict]) -> tuple[float, int]:
    worst, compared = 0.0, 0
    for r, s in zip(a, b, strict=True):
        for k, v in r.items():
            w = s[k]
            if isinstance(v, float):
                if not (math.isnan(v) and math.isnan(w)):
                    worst = max(worst, abs(v - w))
                compared += 1
            elif isinstance(v, list) and v and isinstance(v[0], float):
                x, y = np.asarray(v, float), np.asarray(w, float)
                assert np.array_equal(np.isnan(x), np.isnan(y)), k
                worst = max(worst, float(np.nanmax(np.abs(x - y), initial=0.0)))
                compared += x.size
            else:
                assert v == w, (k, v, w)
    return worst, compared


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--shards", type=int, default=4)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        one, t1 = _run(Path(d), a.images, 1)
        many, tk = _run(Path(d), a.images, a.shards)
    worst, compared = max_difference(one, many)
    res = {"images": a.images, "shards": a.shards, "rows": len(one), "values_compared": compared,
           "max_abs_difference": worst, "seconds_one_task": round(t1, 1), "seconds_shards": round(tk, 1),
           "machine": f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end"}
    write_results(Path(__file__).parent / "results", "sweep_shards", res, "\n".join([
        "# A large image set in shards gives the record of one call", "",
        f"Command: `python benchmarks/bench_sweep_shards.py --images {a.images} --shards {a.shards}`. "
        f"Machine: {res['machine']}.", "",
        "The shipped MNIST CNN in float64 (layer conv1), rotation:45, spatial channel with floor and null, "
        f"{a.images} generated glyph images: one task against {a.shards} shards, local executor.", "",
        "| rows | values compared | max abs difference | one task s | shards s |", "|---|---|---|---|---|",
        f"| {len(one)} | {compared:,} | {worst:.3g} | {t1:.0f} | {tk:.0f} |", ""]))


if __name__ == "__main__":
    main()
