"""Benchmark: torchvision resnet50 at 224 px, peak memory and time per image against the FFT bound.

    make test-models   # builds .venv-models (torchvision)
    .venv-models/bin/python benchmarks/bench_resnet50.py [--images 64] [--layers layer1,layer2,layer3]
        [--tiny] [--device cpu|cuda] [--out DIR]

Each layer is measured in a fresh subprocess, as a first ``invariance measure`` does it: random weights
(no download), ``--images`` smooth random 3 x 224 x 224 images, ``rotation:30``, the default
search, spatial channels, with the interpolation floor (computed, not read from the floor cache)
and the random-pair null, the default memory budget. The results are rewritten after every layer
(``complete`` says whether every layer is in). The child reports its wall time and its peak
resident set size (``ru_maxrss``, what ``/usr/bin/time -v`` calls "Maximum resident set size").
It also records every ``rfft2`` / ``irfft2`` the run calls, and times the same calls alone
afterwards on inputs allocated beforehand: the **bare-FFT bound** of that run on this machine. Results go to
``benchmarks/results/resnet50.{json,md}`` (``resnet50_tiny`` for ``--tiny``) with the machine
and the load average. Targets (issue "real networks"): peak <= 2 GB on CPU, time within 3x of
the bare FFTs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.clamp(0, 1)


def child(args) -> None:
    """One layer in this process: measure, then the bare FFTs it needed; prints one JSON line."""
    import torchvision
    from _fft import recorded_ffts, time_ffts
    from _machine import cpu_share, cpu_times

    from invariance import SearchConfig, measure

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(args.device)
    x = smooth_images(args.images, args.size).to(args.device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, cpu0 = time.perf_counter(), cpu_times()
    with recorded_ffts() as calls:
        report = measure(model, x, "rotation:30", layers=args.layer, channels=("spatial",), n_boot=100,
                         config=SearchConfig(n_angles=args.angles), progress=False, floor_cache=False,
                         model_name="torchvision resnet50 (random weights)")
    seconds, cpu = time.perf_counter() - t0, cpu_share(cpu0, cpu_times())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fft_seconds = time_ffts(calls, args.device, repeats=0)  # the bare FFTs: the same calls, alone
    rec = report.records[0]
    print(json.dumps({
        "layer": args.layer, "images": args.images, "map": list(report.meta["frames"][args.layer]["size"]),
        "seconds": seconds, "seconds_per_image": seconds / args.images, "fft_seconds": fft_seconds, "cpu": cpu,
        "fft_calls": len(calls), "over_fft": seconds / fft_seconds,
        "peak_rss_gib": peak / 2**20, "rss_before_measure_gib": base / 2**20,
        "batching": report.meta["batching"], "spatial_error": rec.errors.spatial.mean,
        "expected_error": rec.errors.expected.mean,
        "null": None if rec.calibration.null is None else rec.calibration.null.mean,
        "floor": None if rec.calibration.floor is None else rec.calibration.floor.mean,
    }))


def _has_verdict(r: dict) -> bool:
    return r["spatial_error"] is not None and math.isfinite(r["spatial_error"])


def _system(r: dict) -> str:
    return f"{r['cpu']['system_share']:.1%}" if "cpu" in r else "-"  # records before the column: none


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"# torchvision resnet50, 224 px, rotation:30 ({out['device']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); "
             f"GPU: {m['gpu'] or 'none'}. Load average before {out['load_before']}, after {out['load_after']}.", "",
             f"Command: `{out['command']}`", "",
             f"Random weights, smooth random images, default search ({out['angles']} angles), spatial channels, "
             "with the interpolation floor (computed afresh in each process: `floor_cache=False`) and the "
             "random-pair null, default memory budget; one fresh process per layer. *peak*: the "
             "process's maximum resident set size (as `/usr/bin/time -v`). *bare FFTs*: every `rfft2`/`irfft2` "
             "the run called, timed alone afterwards. *system*: the system share of the run's CPU time "
             "(`getrusage`; page faults of buffers the allocator returned and took again).", "",
             "| layer (map) | images | images per batch | peak memory | time | per image | bare FFTs "
             "| time / FFTs | system | spatial | null |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    measured = [r for r in out["results"] if _has_verdict(r)]
    for r in out["results"]:
        h, w = r["map"]
        if not _has_verdict(r):  # nothing was searched: its time is the model's, its ratios say nothing
            lines.append(f"| {r['layer']} ({h}x{w}) | {r['images']} | - | {r['peak_rss_gib']:.2f} GiB "
                         f"| {r['seconds']:.0f} s | - | - | no verdict | - | - | - |")
            continue
        lines.append(f"| {r['layer']} ({h}x{w}) | {r['images']} | {r['batching']['images_per_batch']} "
                     f"| {r['peak_rss_gib']:.2f} GiB | {r['seconds']:.0f} s | {r['seconds_per_image']:.2f} s "
                     f"| {r['fft_seconds']:.0f} s | **{r['over_fft']:.2f}x** | {_system(r)} | {r['spatial_error']:.3f} "
                     f"| {r['null']:.3f} |")
    peak = max(r["peak_rss_gib"] for r in out["results"])
    shares = [r["cpu"]["system_share"] for r in measured if "cpu" in r]
    lines += ["", f"- Peak memory <= 2 GB (1.86 GiB): **{peak * 2**30 <= 2e9}** (largest {peak:.2f} GiB)."]
    if measured:
        worst = max(r["over_fft"] for r in measured)
        lines += [f"- Time within 3x of the bare FFTs: **{worst <= 3}** (worst {worst:.2f}x)."]
    else:
        lines += ["- Time within 3x of the bare FFTs: no layer has a verdict, nothing to check."]
    if shares:
        lines += [f"- System time <= 5% of the CPU time: **{max(shares) <= 0.05}** (worst {max(shares):.1%})."]
    if len(measured) < len(out["results"]):
        lines += ["- *no verdict*: no image has one at this layer (its receptive field covers the image, so no "
                  "position sees only the image; `measure` gives NaN with the reason): nothing to time, and the "
                  "checks above leave it out."]
    if not out.get("complete", True):
        lines += ["", f"**Incomplete**: the results of the first {len(out['results'])} layer(s) only (the run was "
                  "stopped, e.g. by its time cap, or is still running)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--layers", default="layer1,layer2,layer3")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--angles", type=int, default=72, help="angles of the coarse search (default 72, as measure)")
    ap.add_argument("--tiny", action="store_true", help="2 images at 64 px, layer1: a smoke run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--layer", help=argparse.SUPPRESS)  # the child's one layer
    args = ap.parse_args()
    if args.tiny:
        args.images, args.size, args.layers = 2, 64, "layer1"
    if args.layer:
        child(args)
        return
    from _machine import machine, write_results


    load_before = os.getloadavg()
    results: list = []
    stem = "resnet50" + ("_tiny" if args.tiny else "")
    layers = args.layers.split(",")
    for layer in layers:
        cmd = [sys.executable, __file__, "--layer", layer, "--images", str(args.images), "--size", str(args.size),
               "--device", args.device, "--angles", str(args.angles)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"layer {layer} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        # after every layer: a run stopped by a time cap (benchmarks/gpu_suite.sh) leaves the layers it did
        out = {"device": args.device, "angles": args.angles, "machine": machine(),
               "command": "python benchmarks/bench_resnet50.py " + " ".join(sys.argv[1:]),
               "complete": len(results) == len(layers),
               "load_before": [round(v, 2) for v in load_before],
               "load_after": [round(v, 2) for v in os.getloadavg()], "results": results}
        write_results(args.out, stem, out, markdown(out))


if __name__ == "__main__":
    main()
