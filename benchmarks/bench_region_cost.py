"""Benchmark: what the comparison region, the distinct-basin starts and the polish cost, side by side.

    python benchmarks/bench_region_cost.py [--rev REV]

The previous search (``invariance/_search.py`` at git revision ``REV``: a fixed disk, the top-2
coarse candidates refined, no polish) and the current one are run in the same process on the
same maps and the same candidates, alternating, median of ``--repeats``:

1. the coarse search alone (``refine_steps=0``): the region's extra FFT terms;
2. the default search (what ``invariance.measure`` runs): plus the distinct-basin starts and
   the polish.

Target: the current search costs at most 1.5x the previous one. Written to
``benchmarks/results/search_region_cost.{json,md}`` with the machine and its load.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

import invariance  # noqa: E402
from invariance import SearchConfig, align, disk_mask, warp  # noqa: E402  # noqa: E402
from invariance import geometry as G  # noqa: E402
from invariance.files import atomic_write_json, atomic_write_text  # noqa: E402

PREVIOUS = "7952e9a"  # the last revision before the comparison region


def previous_search(rev: str):
    """The module ``invariance/_search.py`` as it was at ``rev``, importable beside the current one."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:invariance/_search.py"], check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("invariance._previous_search", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "invariance"
    sys.modules[spec.name] = mod
    # what that revision imported from ``.warp``, now in invariance._warp and invariance.checks
    shim = types.ModuleType("invariance.warp")
    shim.__dict__.update(warp=invariance.warp, warp_chunks=invariance.warp_chunks, disk_mask=invariance.disk_mask,
                         _check_images=invariance.checks.check_images)
    sys.modules.setdefault("invariance.warp", shim)
    exec(compile(src, f"{rev}:invariance/_search.py", "exec"), mod.__dict__)  # noqa: S102
    return mod


def maps(b, c, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.rand(b, c, s, s, generator=g), 5, 1, 2)
    x = (x - x.mean((2, 3), keepdim=True)) * disk_mask((s, s), 0.8)
    rot = G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([33.0, 1.7, -2.2])), (s, s))
    return x, warp(x, rot)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default=PREVIOUS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    old = previous_search(a.rev)
    load = os.getloadavg()
    b, c, s, n_angles = 16, 64, 20, 36
    ref, mov = maps(b, c, s)
    mask = disk_mask((s, s)).float()
    rows = []
    for label, kw_old, kw_new in [
        ("coarse only (refine_steps=0)", dict(n_angles=n_angles, refine_steps=0, top_k=1),
         dict(n_angles=n_angles, refine_steps=0, top_k=1)),
        ("default search (refinement, starts, polish)", dict(n_angles=n_angles), dict(n_angles=n_angles)),
    ]:
        co, cn = old.SearchConfig(**kw_old), SearchConfig(**kw_new)
        old.align(ref[:1], mov[:1], "rigid", mask=mask, config=co)  # warm up
        align(ref[:1], mov[:1], "rigid", mask=mask, config=cn)
        to, ro = timed(lambda co=co: old.align(ref, mov, "rigid", mask=mask, config=co), a.repeats)
        tn, rn = timed(lambda cn=cn: align(ref, mov, "rigid", mask=mask, config=cn), a.repeats)
        rows.append({"search": label, "previous_seconds": to, "current_seconds": tn, "ratio": tn / to,
                     "previous_mean_error": float(ro.errors.mean()), "current_mean_error": float(rn.errors.mean())})
        print(rows[-1], flush=True)
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "platform": platform.platform(), "load_before": load, "load_after": os.getloadavg()},
              "previous_revision": a.rev, "current_version": invariance.__version__,
              "problem": {"images": b, "channels": c, "size": s, "angles": n_angles, "family": "rigid",
                          "mask": "disk radius 1"},
              "rows": rows, "target_ratio_at_most": 1.5}
    out = Path(a.out)
    atomic_write_json(out / "search_region_cost.json", result)
    md = ["# What the comparison region and the extra starts cost", "",
          f"Command: `python benchmarks/bench_region_cost.py --rev {a.rev}`. Machine: {result['machine']['cpu']}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}; load average {load[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after. Same process, same maps ({b} x {c} x {s} x {s}, rigid, {n_angles} "
          f"angles x all shifts, disk mask), median of {a.repeats}.", "",
          "The errors differ by definition: the previous search scored the warp's zero fill against the "
          "reference (a fixed disk); the current one compares only where both maps are defined.", "",
          "| search | previous (s) | current (s) | ratio | previous mean error | current mean error |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['search']} | {r['previous_seconds']:.2f} | {r['current_seconds']:.2f} | "
                  f"**{r['ratio']:.2f}x** | {r['previous_mean_error']:.4f} | {r['current_mean_error']:.4f} |")
    md += ["", f"Target: at most 1.5x. Verdict: {'PASS' if all(r['ratio'] <= 1.5 for r in rows) else 'FAIL'}."]
    atomic_write_text(out / "search_region_cost.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
