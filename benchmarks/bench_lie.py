"""Benchmark: what the ``lie`` channel costs, in forward passes, side by side with ``measure``.

    .venv/bin/python benchmarks/bench_lie.py                       # the MNIST CNN, 28 px
    .venv-models/bin/python benchmarks/bench_lie.py --model resnet18 --layer layer2 --size 224 --images 8

In one process, repeated in turn (A B C D, A B C D, ...; the medians are reported):

* ``forward``: one plain forward pass collecting every layer's map (``FeatureExtractor``);
* ``lie``: ``invariance.lie_derivative(calibrate=False)``: the same pass in forward mode along the
  transformation's image derivative (every layer's Lie derivative at once) and every layer's
  least-squares fit (``r²`` and ``a²``);
* ``lie + floor``: ``invariance.lie_derivative`` with its floor and null: the pass along three
  directions (the transformation's and the two unit translations of the grid floor) and the fits;
* ``measure``: ``measure(channels="spatial")`` of one layer (``--layer``) with its interpolation
  floor (not cached) and null: the finite search the channel sits beside.

Target (issue "the infinitesimal view"): ``lie`` <= 3 forward passes per image per layer. Written to
``benchmarks/results/lie_cost_<model>.{json,md}`` with the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import cpu_model, write_results  # noqa: E402  (benchmarks/, the script's own folder)

import invariance  # noqa: E402


def _model(name: str):
    if name == "mnist":
        return invariance.random_mnist_cnn(seed=0).eval(), 28, "conv2"
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval(), 224, "layer2"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist", choices=("mnist", "resnet18", "resnet50"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=None, help="image side (default: 28 for mnist, 224 otherwise)")
    p.add_argument("--layer", default=None, help="the layer `measure` measures (default: conv2 / layer2)")
    p.add_argument("--transform", default="rotation:5")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load = os.getloadavg()
    model, size, layer = _model(a.model)
    size, layer = a.size or size, a.layer or layer
    channels = 1 if a.model == "mnist" else 3
    x = invariance.toys.make_blob_images(a.images, size, seed=0)
    x = x.expand(-1, channels, -1, -1).contiguous()
    tr = invariance.parse_transforms(a.transform)[0]
    ex = invariance.FeatureExtractor(model, "all")
    n_layers = len(ex(x[:2])[0])
    runs = {
        "forward": lambda: ex(x),
        "lie": lambda: invariance.lie_derivative(model, x, tr, calibrate=False),
        "lie + floor": lambda: invariance.lie_derivative(model, x, tr),
        "measure": lambda: invariance.measure(model, x, tr, layers=layer, channels="spatial", n_boot=0,
                                              progress=False, floor_cache=False),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.repeats):
        for k, fn in runs.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd = med["forward"]
    out = {"model": a.model, "images": a.images, "size": size, "layers": n_layers, "measure_layer": layer,
           "transform": tr.label, "repeats": a.repeats, "seconds": med, "all_seconds": times,
           "in_forward_passes": {k: v / fwd for k, v in med.items()},
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "load_before": [round(v, 2) for v in load],
                       "load_after": [round(v, 2) for v in os.getloadavg()]}}
    lines = [f"# The `lie` channel's cost: {a.model}, {a.images} images of {size} px, {tr.label}", "",
             f"Medians of {a.repeats} interleaved repeats, one process; {n_layers} layers in the forward pass; "
             f"`measure` measures `{layer}` alone (spatial, floor not cached, null). Machine: {cpu_model()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}; load average {load[0]:.2f} before, "
             f"{os.getloadavg()[0]:.2f} after.", "",
             "| run | seconds | forward passes | per image per layer |", "|---|---|---|---|"]
    for k, v in med.items():
        per = f"{v / fwd / n_layers:.3f}" if k != "measure" else "(one layer)"
        lines.append(f"| {k} | {v:.3f} | {v / fwd:.2f} | {per} |")
    lines += ["", f"Target: `lie` <= 3 forward passes per image per layer: one pass gives every layer's "
              f"derivative, so `lie` (with its fits) costs {med['lie'] / fwd:.2f} forward passes for all "
              f"{n_layers} layers "
              f"({med['lie'] / fwd / n_layers:.3f} per layer); with its floor, null and fits "
              f"{med['lie + floor'] / fwd:.2f}. One layer's finite `measure` costs "
              f"{med['measure'] / fwd:.0f} forward passes."]
    write_results(a.out, f"lie_cost_{a.model}", out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
