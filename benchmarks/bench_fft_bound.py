"""Benchmark: the alignment search against its FFT bound and the per-candidate loop, side by side.

    python benchmarks/bench_fft_bound.py [--tiny] [--device cpu|cuda] [--out DIR]

For map sizes of real networks (torchvision resnet50 at 224 px: layer1 256 x 56 x 56, layer2
512 x 28 x 28, layer3 1024 x 14 x 14), rigid search (72 angles x every integer shift, as
``measure`` runs it for rotations), in one process:

* **bare FFTs**: every ``rfft2`` / ``irfft2`` the search's coarse stage calls is recorded
  (shapes and sizes) during one run, then the same calls are timed alone on inputs allocated
  beforehand: the time of the FFTs the search needs and nothing else, on this machine;
* **coarse search**: :func:`invariance.align` without refinement (``refine_steps=0``,
  ``polish_levels=0``), the exhaustive stage the FFT bound is about;
* **default search**: :func:`invariance.align` with the default settings (coarse, Adam
  refinement from 6 starts, compass polish), what ``measure`` runs;
* **loop**: the straightforward per-candidate loop (``affine_grid`` + ``grid_sample`` + masked
  error, ``benchmarks/bench_search.py``) on a sample of the same candidates, as candidates x
  images per second, extrapolated to the full candidate set;
* **slice loop**: the best simple loop, which rotates the maps once per angle onto a padded
  canvas and slices the window of every shift (``bench_search.slice_loop_search``): its rotation
  and its first ``--loop-candidates`` shifts of one angle are timed and extrapolated (rotations x
  angles + shifts x candidates); on those candidates its minimum must equal the per-candidate
  loop's.

Ratios: coarse / bare FFTs (target within 3x; issue "near the limit": at >= 70% of the FFTs'
speed), default / bare FFTs, loop / coarse for the same candidate set (target >= 100x) and slice
loop / coarse (issue "near the limit": >= 15x at layer3). Each time is the median of ``--repeats`` runs after a
warm-up. Results go to ``benchmarks/results/fft_bound.{json,md}`` with the machine and the load
average before and after, rewritten after every size (``complete`` says whether every size is in).
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

from _fft import recorded_ffts, time_ffts  # noqa: E402
from _machine import machine, write_results  # noqa: E402
from bench_search import candidate_matrices, loop_search, slice_loop_search, smooth_maps  # noqa: E402

from invariance import SearchConfig, align  # noqa: E402
from invariance import geometry as G  # noqa: E402

SIZES = {"layer1": (256, 56), "layer2": (512, 28), "layer3": (1024, 14)}
TINY = {"tiny": (8, 12), "tiny-small": (4, 8)}


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_align(ref, mov, mask, cfg, device, repeats):
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = align(ref, mov, "rigid", mask=mask, config=cfg)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _median(times[1:]), out


def bench_size(name, c, s, args) -> dict:
    dev = args.device
    b = args.images
    ref = smooth_maps(b, c, s, s, 0, dev)
    rot = G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([33.0, 1.7, -2.2])), (s, s)).to(dev)
    from invariance import warp

    mov = warp(ref, rot)
    mask = torch.ones(s, s, device=dev)
    coarse = SearchConfig(refine_steps=0, polish_levels=0)
    default = SearchConfig()
    with recorded_ffts() as calls:
        align(ref, mov, "rigid", mask=mask, config=coarse)
    t_fft = time_ffts(calls, dev, args.repeats)
    t_coarse, res_coarse = time_align(ref, mov, mask, coarse, dev, args.repeats)
    t_default, res_default = time_align(ref, mov, mask, default, dev, args.repeats)
    # the loop, on a sample of the same candidate set (all shifts of the first angles)
    mats = candidate_matrices(coarse.n_angles, s, s, torch.float32, dev)
    n_loop = min(mats.shape[0], args.loop_candidates)
    loop_search(ref[:1], mov[:1], mats, mask, limit=2)
    t0 = time.perf_counter()
    loop_search(ref, mov, mats, mask, limit=n_loop)
    t_loop_sample = time.perf_counter() - t0
    t_loop = t_loop_sample * mats.shape[0] / n_loop
    # the rotate-once-and-slice loop, on the first shifts of the first angle, extrapolated; the
    # same candidates as the per-candidate loop's sample, so the two minima must agree
    n_slice = min(mats.shape[0] // coarse.n_angles, args.loop_candidates)
    slice_loop_search(ref[:1], mov[:1], coarse.n_angles, mask, angles=1, shifts=2)
    t0 = time.perf_counter()
    slice_loop_search(ref, mov, coarse.n_angles, mask, angles=1, shifts=0)  # the rotation alone
    t_rotate = time.perf_counter() - t0
    t0 = time.perf_counter()
    slice_best, _ = slice_loop_search(ref, mov, coarse.n_angles, mask, angles=1, shifts=n_slice)
    t_shift = max(time.perf_counter() - t0 - t_rotate, 0.0) / n_slice
    t_slice = coarse.n_angles * t_rotate + mats.shape[0] * t_shift
    loop_best, _ = loop_search(ref, mov, mats, mask, limit=n_slice)
    return {
        "layer": name, "images": b, "channels": c, "size": s, "candidates": int(mats.shape[0]),
        "fft_calls": len(calls), "fft_seconds": t_fft, "coarse_seconds": t_coarse, "default_seconds": t_default,
        "loop_seconds_extrapolated": t_loop, "loop_candidates_timed": n_loop,
        "coarse_over_fft": t_coarse / t_fft, "default_over_fft": t_default / t_fft,
        "loop_over_coarse": t_loop / t_coarse,
        "slice_loop_seconds_extrapolated": t_slice, "slice_loop_candidates_timed": n_slice,
        "slice_loop_over_coarse": t_slice / t_coarse,
        "slice_loop_same_optimum": bool(torch.allclose(slice_best, loop_best, rtol=1e-5, atol=1e-7)),
        "coarse_error": res_coarse.errors.cpu().tolist(), "default_error": res_default.errors.cpu().tolist(),
        "seconds_per_image_default": t_default / b,
    }


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"# Search vs its FFT bound ({out['device']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
             f"GPU: {m['gpu'] or 'none'}. Load average before {out['load_before']}, after {out['load_after']}.", "",
             f"Command: `{out['command']}`", "",
             "Rigid search, 72 angles x every integer shift, smooth random maps; median of "
             f"{out['repeats']} runs after a warm-up. *bare FFTs*: the `rfft2`/`irfft2` calls the coarse "
             "search makes, timed alone. *loop*: affine_grid + grid_sample + masked error per candidate, "
             "timed on a sample of the candidates and extrapolated. *slice loop*: the best simple loop, "
             "which rotates the maps once per angle onto a padded canvas and slices the window of every shift "
             "(`bench_search.slice_loop_search`), its rotation and its first shifts of one angle timed and "
             "extrapolated; on those candidates its minimum equals the per-candidate loop's (*same*).", "",
             "| maps (B x C x H x W) | bare FFTs | coarse search | default search | loop (extrap.) "
             "| slice loop (extrap.) | coarse / FFT | default / FFT | loop / coarse | slice loop / coarse "
             "| same |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(f"| {r['layer']}: {r['images']} x {r['channels']} x {r['size']} x {r['size']} "
                     f"| {r['fft_seconds']:.3f} s | {r['coarse_seconds']:.3f} s | {r['default_seconds']:.3f} s "
                     f"| {r['loop_seconds_extrapolated']:.0f} s | {r['slice_loop_seconds_extrapolated']:.0f} s "
                     f"| **{r['coarse_over_fft']:.2f}x** | {r['default_over_fft']:.2f}x "
                     f"| **{r['loop_over_coarse']:.0f}x** "
                     f"| **{r['slice_loop_over_coarse']:.1f}x** | {r['slice_loop_same_optimum']} |")
    worst = max(r["coarse_over_fft"] for r in out["results"])
    least = min(r["loop_over_coarse"] for r in out["results"])
    least_slice = min(r["slice_loop_over_coarse"] for r in out["results"])
    fraction = min(1 / r["coarse_over_fft"] for r in out["results"])
    lines += ["", f"- Coarse search within 3x of its bare FFTs: **{worst <= 3}** (worst {worst:.2f}x).",
              f"- Coarse search >= 100x the loop: **{least >= 100}** (least {least:.0f}x). The optimum of the "
              "same candidate set is checked against the loop in `bench_search.py`.",
              f"- Coarse search at >= 70% of its bare-FFT speed (issue \"near the limit\"): **{fraction >= 0.7}** "
              f"(least {fraction:.0%}).",
              f"- Coarse search >= 15x the slice loop: **{least_slice >= 15}** (least {least_slice:.1f}x).",
              "- The default search adds the refinement (Adam from 6 starts) and the polish, which do not "
              "scale with the candidate count: the *default / FFT* column."]
    if not out.get("complete", True):
        lines += ["", f"**Incomplete**: the results of the first {len(out['results'])} map size(s) only (the run was "
                  "stopped, e.g. by its time cap, or is still running)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests, the GPU script)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-candidates", type=int, default=400)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.tiny:
        args.repeats, args.loop_candidates = 1, 20
    load_before = os.getloadavg()
    sizes = TINY if args.tiny else SIZES
    results: list = []
    for name, (c, s) in sizes.items():
        results.append(bench_size(name, c, s, args))
        # after every size: a run stopped by a time cap (benchmarks/gpu_suite.sh) leaves the sizes it did
        out = {"device": args.device, "machine": machine(), "repeats": args.repeats,
               "command": "python benchmarks/bench_fft_bound.py " + " ".join(sys.argv[1:]),
               "complete": len(results) == len(sizes),
               "load_before": [round(x, 2) for x in load_before],
               "load_after": [round(x, 2) for x in os.getloadavg()], "results": results}
        write_results(args.out, "fft_bound" + ("_tiny" if args.tiny else ""), out, markdown(out))


if __name__ == "__main__":
    main()
