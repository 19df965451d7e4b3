"""Battery: may the interpolation floor search only near the expected warp? Full grid against near grid.

    python benchmarks/bench_floor_grid.py [--quick] [--out DIR]

The interpolation floor (docs/definitions.md, "Calibration") is the spatial error of the images
themselves under the transformation and the search: the default search, its whole exhaustive
grid (72 angles for ``rigid``) on the input images. The identity network's optimum lies by
construction near the inverse of the transformation, so a search of the grid's neighbourhood of
that warp (:func:`invariance.interpolation_floor` with ``grid="near"``: the linear parts within
two grid steps of it, every integer shift, the half-pixel pass, then the same refinement and
polish) would cost a fraction of it. Whether it gives **the same floor** is an empirical
question; this battery answers it: per case, both floors of every image, side by side in one
process, their largest difference and the time of each.

Cases: the 500 digits shipped with the package (28 x 28, MNIST), Fashion-MNIST test images
where ``INVARIANCE_DATA`` (or the usual data folders) hold them, and smooth random images
(64 and 224 px, 3 channels), under rotations (5-180 degrees), scalings (0.5-2), a sub-pixel
translation, similarities and a shear, each with its default search family. Written to
``benchmarks/results/floor_grid.{json,md}`` with the machine and the load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import machine, write_results  # noqa: E402
from bench_resnet50 import smooth_images  # noqa: E402

import invariance  # noqa: E402

TRANSFORMS = ["rotation:5", "rotation:17", "rotation:30", "rotation:45", "rotation:90", "rotation:120",
              "rotation:180", "scale:0.5", "scale:0.8", "scale:1.25", "scale:2", "translation:2.5,-1",
              "similarity:30,1.5,0,0", "similarity:-60,0.7,1.5,-0.5", "affine:1,0.3,0,0,1,0"]


def _images(quick: bool) -> dict[str, torch.Tensor]:
    digits, _ = invariance.load_digits()
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(digits.shape[0], generator=g)[: 6 if quick else 16]
    out = {"digits 28px": digits[pick, None].double() / 255}
    try:
        from invariance.datasets import load_dataset

        x, _ = load_dataset("fashion-mnist", "test")
        out["fashion 28px"] = x[: 3 if quick else 8, None].double() / 255
    except Exception as exc:  # noqa: BLE001  (no data here: the battery says so)
        print(f"fashion-mnist skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
    out["smooth 64px"] = smooth_images(3 if quick else 6, 64, seed=1).double()
    if not quick:
        out["smooth 224px"] = smooth_images(2, 224, seed=2).double()
    return out


def run_case(name: str, x: torch.Tensor, spec: str) -> dict:
    tr = invariance.parse_transforms(spec)[0]
    fam = invariance.DEFAULT_SEARCH[tr.family]
    t_img = tr.matrix(tuple(x.shape[-2:]), torch.float64)
    floors, secs = {}, {}
    for grid in ("full", "near"):
        t0 = time.perf_counter()
        floors[grid] = invariance.interpolation_floor(x, t_img, fam, grid=grid)
        secs[grid] = time.perf_counter() - t0
    full, near = floors["full"], floors["near"]
    both = torch.isfinite(full) & torch.isfinite(near)  # an image without a verdict has a NaN floor
    diff = (near - full)[both]
    rel = diff.abs() / full[both].clamp_min(1e-12)
    return {"images": name, "transform": spec, "family": fam, "n": int(x.shape[0]),
            "full": full.tolist(), "near": near.tolist(),
            "full_mean": float(full[both].mean()) if bool(both.any()) else float("nan"),
            "verdict_differs": int((torch.isfinite(full) != torch.isfinite(near)).sum()),
            "max_abs_diff": float(diff.abs().max()) if diff.numel() else 0.0,
            "max_rel_diff": float(rel.max()) if rel.numel() else 0.0,
            "near_higher": int((diff > 1e-9).sum()), "near_lower": int((diff < -1e-9).sum()),
            "full_seconds": secs["full"], "near_seconds": secs["near"], "speedup": secs["full"] / secs["near"]}


def markdown(out: dict) -> str:
    m = out["machine"]
    rows = out["results"]
    lines = ["# The floor: full grid against the expected warp's neighbourhood", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; load average before "
             f"{out['load_before']}, after {out['load_after']}. Command: `{out['command']}`.", "",
             "Per case, the floor of every image with the default search's whole grid (*full*) and with its "
             "linear parts within two grid steps of the expected warp (*near*, `interpolation_floor(grid=\"near\")`), "
             "float64, side by side. *higher* / *lower*: images whose near floor is above / below the full one by "
             "more than 1e-9; images without a verdict (a NaN floor in both) are left out, and *verdict* counts "
             "those with a verdict in one only.", "",
             "| images | transform | family | n | full floor (mean) | max abs. diff | max rel. diff | higher | lower "
             "| verdict | full | near | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['images']} | {r['transform']} | {r['family']} | {r['n']} | {r['full_mean']:.4g} "
                     f"| {r['max_abs_diff']:.1e} | {r['max_rel_diff']:.1e} | {r['near_higher']} | {r['near_lower']} "
                     f"| {r['verdict_differs']} "
                     f"| {r['full_seconds']:.2f} s | {r['near_seconds']:.2f} s | {r['speedup']:.1f}x |")
    n = sum(r["n"] for r in rows)
    higher = sum(r["near_higher"] for r in rows)
    lower = sum(r["near_lower"] for r in rows)
    worst = max(rows, key=lambda r: r["max_rel_diff"])
    t_full, t_near = sum(r["full_seconds"] for r in rows), sum(r["near_seconds"] for r in rows)
    lines += ["", f"- {n} images x transformations in {len(rows)} cases: the near floor is higher on **{higher}**, "
              f"lower on **{lower}**; the largest relative difference is {worst['max_rel_diff']:.1e} "
              f"({worst['images']}, {worst['transform']}).",
              f"- Time: full {t_full:.0f} s, near {t_near:.0f} s (**{t_full / t_near:.1f}x**)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, no 224-px case")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = []
    for name, x in _images(args.quick).items():
        for spec in TRANSFORMS:
            results.append(run_case(name, x, spec))
            r = results[-1]
            print(f"{name} {spec}: max rel diff {r['max_rel_diff']:.1e} (higher {r['near_higher']}, lower "
                  f"{r['near_lower']}), {r['speedup']:.1f}x", flush=True)
    out = {"machine": machine(), "command": "python benchmarks/bench_floor_grid.py " + " ".join(sys.argv[1:]),
           "load_before": [round(v, 2) for v in load_before],
           "load_after": [round(v, 2) for v in os.getloadavg()], "results": results}
    write_results(args.out, "floor_grid" + ("_quick" if args.quick else ""), out, markdown(out))


if __name__ == "__main__":
    main()
