"""Benchmark: how much of the search's time is the allocator's? glibc's defaults against fixed thresholds.

    python benchmarks/bench_allocator.py [--repeats 2]

The same rigid search in fresh processes, alternately with glibc's default allocator settings and
with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at 1 GiB (large buffers come from the
heap and stay there instead of being mapped, returned and page-faulted back): *quick full size*,
``bench_search.py --quick``'s exhaustive search (16 x 64 x 28 x 28 maps, 90 angles, every shift,
no refinement), and *default*, the default search with its refinement and polish on 4 x 512 x 28 x 28
maps (resnet50 ``layer2``'s shape). Per case the wall time, the user and system CPU seconds
(``getrusage``) and the page faults, the best of ``--repeats`` runs. The errors must be identical:
the allocator changes where memory lives, not a value. Written to
``benchmarks/results/allocator.{json,md}`` with the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import cpu_share, cpu_times, machine_record, write_results  # noqa: E402  (benchmarks/)

CASES = {"quick full size": (16, 64, 28, 90, {"refine_steps": 0, "top_k": 1, "subpixel_top": 0}),
         "default": (4, 512, 28, 72, {})}
TUNED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def child(case: str) -> None:
    from bench_search import smooth_maps

    from invariance import SearchConfig, align, disk_mask, warp
    from invariance import geometry as G

    torch.set_num_threads(os.cpu_count() or 1)
    b, c, s, n_angles, kw = CASES[case]
    ref = smooth_maps(b, c, s, s, 1, "cpu")
    mov = warp(ref, G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([-71.0, 2.0, 3.0])), (s, s)))
    mask = disk_mask((s, s)).to(ref.dtype)
    t0, cpu0 = time.perf_counter(), cpu_times()
    out = align(ref, mov, "rigid", mask=mask, config=SearchConfig(n_angles=n_angles, **kw))
    print(json.dumps({"wall_s": time.perf_counter() - t0, **cpu_share(cpu0, cpu_times()),
                      "errors": out.errors.tolist()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child)
    load = os.getloadavg()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    rows = []
    for case in CASES:
        runs = {"default": [], "tuned": []}
        for _ in range(a.repeats):
            for name, extra in (("default", {}), ("tuned", TUNED)):
                out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True,
                                     check=True, env={**base_env, **extra})
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
        rows.append({"case": case, **best, "same_errors": best["default"]["errors"] == best["tuned"]["errors"],
                     "speedup": best["default"]["wall_s"] / best["tuned"]["wall_s"]})
        print(case, {k: (round(v["wall_s"], 2), round(v["system_share"], 3)) for k, v in best.items()}, flush=True)
    machine = machine_record(load)
    lines = ["# The allocator's share of the search", "",
             f"Command: `python benchmarks/bench_allocator.py --repeats {a.repeats}`. Machine: {machine['cpu']}, "
             f"{machine['cores']} cores, torch {torch.__version__}; load average {load[0]:.1f} before, "
             f"{machine['load_after'][0]:.1f} after. *tuned*: `MALLOC_MMAP_THRESHOLD_` and "
             "`MALLOC_TRIM_THRESHOLD_` at 1 GiB (glibc); best of the repeats, fresh processes, alternately.", "",
             "| case | default: wall | system share | page faults | tuned: wall | system share | page faults "
             "| speed-up | same errors |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, t = r["default"], r["tuned"]
        lines.append(f"| {r['case']} | {d['wall_s']:.2f} s | {d['system_share']:.1%} | {d['minor_faults']} | "
                     f"{t['wall_s']:.2f} s | {t['system_share']:.1%} | {t['minor_faults']} | "
                     f"**{r['speedup']:.2f}x** | {r['same_errors']} |")
    lines += ["", "Target (issue \"near the limit\"): system time at most 5% of the CPU time.", ""]
    write_results(a.out, "allocator", {"machine": machine, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
