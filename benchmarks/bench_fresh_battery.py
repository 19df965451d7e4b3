"""Benchmark: the default search against the dense reference on a *fresh* battery of random networks.

    python benchmarks/bench_fresh_battery.py [--seed 2026] [--architectures 25] [--images 2] [--size 48]

The battery (:func:`invariance.reference.fresh_battery`) is drawn from a seed: random CNNs
(kernels 3-7, strides 1-2, dilation, max / average pooling, ReLU / GELU / LeakyReLU / tanh / SiLU,
random weights with biases) x transformations no grid was tuned on (rotations by 17, 45, 120 and
-73 degrees, scales 0.6 and 1.7, a similarity, a shift that is no multiple of any stride) x image
kinds (shipped digits, smooth blobs), measured at each network's last layer on the comparison
region of docs/definitions.md. For every image, :func:`invariance.align` (default settings) is
compared with :func:`invariance.reference.brute_force_align` (every feasible integer shift of a
dense grid of linear parts and sub-pixel offsets, then Nelder-Mead; it shares none of the search's
code), and the returned optimum is checked against the feasibility rule (positions and signal
kept, re-measured here). Target: worst gap (fast - reference) <= 1e-3, no optimum below the
minimum. ``--compare`` also times a second search setting on the same cases, side by side.
``--cost-against REV`` times the default search of commit ``REV`` (a git worktree) and of this
checkout on the battery's cases, alternately in fresh one-thread processes (``_time_search.py``),
``--cost-repeats`` times each, and records the ratio of the per-case minima: the issue's "at most
2x today's cost" compares with the code as it was, not with a setting of today's code.

Results go to ``benchmarks/results/fresh_battery.{json,md}`` after every case; a run that is
interrupted resumes where it stopped (cases already in the JSON with the same search settings are
skipped; after a change of the search only the search is re-run, the reference's answers are
kept, as it shares no code with the search; ``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

from invariance import SearchConfig, align, warp_valid  # noqa: E402
from invariance.files import atomic_write_json, atomic_write_text  # noqa: E402
from invariance.reference import brute_force_align, fresh_battery  # noqa: E402

TARGET = 1e-3
#: The reference's grid per search family (finer than any search setting; similarity is 2-D in its
#: linear part, so a coarser grid there, polished by Nelder-Mead like every family).
REFERENCE = {
    "translation": dict(offsets=4),
    "rigid": dict(angle_step=1.0, offsets=2),
    "scale_translation": dict(log2_step=1 / 32, log2_range=2.0, offsets=2),
    "similarity": dict(angle_step=2.0, log2_step=1 / 16, log2_range=1.0, offsets=2),
}
#: Today's search without the stages the fresh battery asked for (``--compare baseline``): no half-pixel
#: pass, the best refined start alone polished, no local re-search. (The code before the battery is
#: compared with ``--cost-against REV``.)
BASELINE = dict(subpixel_top=0, polish_starts=1, hop_steps=())


def rule_check(case, out) -> list[bool]:
    """Per image: does the returned warp keep the positions and signal the rule asks for?"""
    cfg = SearchConfig()
    ok = []
    region, mvalid = case.mask.double(), case.moving_mask.double()
    v_exp = warp_valid(mvalid, case.expected.double())
    o_exp = float((region * v_exp).sum())
    for i in range(case.reference.shape[0]):
        f = case.reference[i]
        mu = (f * region).sum((-2, -1), keepdim=True) / region.sum()
        plane = ((f - mu) ** 2).sum(0) * region
        total = float(plane.sum())
        if math.isnan(float(out.errors[i])):
            ok.append(True)
            continue
        v = warp_valid(mvalid, out.matrices[i].double())
        kept, sig = float((region * v).sum()), float((plane * v).sum())
        need_n = max(4.0, cfg.min_overlap * o_exp)
        need_s = max(cfg.min_signal * total, cfg.min_overlap * float((plane * v_exp).sum()))
        ok.append(kept >= need_n - 1e-9 and sig >= need_s - 1e-12 * total)
    return ok


def gaps(fast: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """fast - reference per image; 0 where neither has a verdict, inf where only one has."""
    out = []
    for a, b in zip(fast.tolist(), ref.tolist()):
        if math.isnan(a) and math.isnan(b):
            out.append(0.0)
        elif math.isnan(a) or math.isnan(b):
            out.append(math.inf)
        else:
            out.append(a - b)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--architectures", type=int, default=25)
    p.add_argument("--transforms", type=int, default=2, help="transformations per architecture (default 2)")
    p.add_argument("--images", type=int, default=2, help="images per case (default 2)")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--compare", choices=("baseline",), default=None,
                   help="also time the search settings before the fresh battery, side by side")
    p.add_argument("--skip-family", action="append", default=[], choices=sorted(REFERENCE),
                   help="leave out the cases of a search family (their reference is too slow for the session)")
    p.add_argument("--cost-against", metavar="REV", default=None,
                   help="also time the default search of git commit REV against this checkout's (fresh processes)")
    p.add_argument("--cost-repeats", type=int, default=2, help="alternating runs of each side (default 2)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(a.out)
    path = out / "fresh_battery.json"
    # a case's name identifies it within the draws of one seed, transformation count, image count and size
    same = ("seed", "transforms", "images", "size")
    settings = {k: getattr(a, k) for k in same}
    done: dict[str, dict] = {}
    if path.exists() and not a.fresh:
        prev = json.loads(path.read_text())
        if {k: prev.get("settings", {}).get(k) for k in same} == settings:
            done = {r["name"]: r for r in prev["cases"]}
    settings.update(architectures=a.architectures, compare=a.compare, skip_family=sorted(a.skip_family),
                    cost_against=a.cost_against)
    load = os.getloadavg()
    search = repr(SearchConfig())
    cases = fresh_battery(a.seed, n_architectures=a.architectures, transforms_per_architecture=a.transforms,
                          n_images=a.images, size=a.size)
    rows = []
    skipped = [c.name for c in cases if c.family in a.skip_family]
    for case in cases:
        if case.family in a.skip_family:
            continue
        old = done.get(case.name)
        if old is not None and old.get("search") == search and (not a.compare or "baseline" in old):
            rows.append(old)
            continue
        kw = dict(mask=case.mask, moving_mask=case.moving_mask, expected=case.expected)
        t0 = time.perf_counter()
        fast = align(case.reference, case.moving, case.family, **kw)
        t1 = time.perf_counter()
        if old is None:
            ref = brute_force_align(case.reference, case.moving, case.family, **kw, **REFERENCE[case.family])
            r_err, r_par, r_sec = ref.errors, ref.params.tolist(), time.perf_counter() - t1
        else:  # the reference's answer does not depend on the search settings
            r_err, r_par, r_sec = torch.tensor(old["reference"], dtype=torch.float64), old["reference_params"], \
                old["reference_seconds"]
        row = {"name": case.name, "family": case.family, "shape": list(case.reference.shape), "search": search,
               "fast": fast.errors.tolist(), "reference": r_err.tolist(),
               "gap": gaps(fast.errors, r_err), "rule_ok": rule_check(case, fast),
               "fast_params": fast.params.tolist(), "reference_params": r_par,
               "fast_seconds": t1 - t0, "reference_seconds": r_sec}
        if a.compare == "baseline":
            t3 = time.perf_counter()
            base = align(case.reference, case.moving, case.family, config=SearchConfig(**BASELINE), **kw)
            row["baseline"] = base.errors.tolist()
            row["baseline_gap"] = gaps(base.errors, r_err)
            row["baseline_seconds"] = time.perf_counter() - t3
        rows.append(row)
        print(f"{case.name[:90]}: gap {max(row['gap']):+.2e} ({row['fast_seconds']:.1f} s / "
              f"{row['reference_seconds']:.1f} s)", flush=True)
        write(out, settings, load, rows, skipped, done=False)
    cost = None
    if a.cost_against:
        timed = [c for c in cases if c.family not in a.skip_family]
        cost = cost_against(a.cost_against, timed, a.cost_repeats)
    write(out, settings, load, rows, skipped, done=True, cost=cost)


def cost_against(rev: str, cases, repeats: int) -> dict:
    """The default search of commit ``rev`` and of this checkout timed on the same ``cases``,
    alternately (``rev``, this, ``rev``, this, ...) in fresh one-thread processes; per case the
    minimum over the repeats. The commit is checked out as a temporary git worktree."""
    if repeats < 1:
        raise SystemExit(f"--cost-repeats: must be a positive integer, got {repeats}")
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"--cost-against: {rev!r} is not a commit of {ROOT}")
    sha = sha.stdout.strip()
    child = Path(__file__).with_name("_time_search.py")
    with tempfile.TemporaryDirectory() as tmp:
        old_root = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_root), sha], check=True,
                       capture_output=True)
        try:
            saved = Path(tmp) / "cases.pt"
            torch.save([dict(reference=c.reference, moving=c.moving, mask=c.mask, moving_mask=c.moving_mask,
                             expected=c.expected, family=c.family) for c in cases], saved)
            runs: dict[str, list[list[float]]] = {"old": [], "new": []}
            for _ in range(repeats):
                for side, root in (("old", old_root), ("new", ROOT)):
                    r = subprocess.run([sys.executable, str(child), str(root), str(saved)], capture_output=True,
                                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                    if r.returncode != 0:
                        raise SystemExit(f"timing {side} ({root}) failed:\n{r.stderr[-2000:]}")
                    runs[side].append(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])
                    print(f"cost: {side} run {len(runs[side])}: {sum(runs[side][-1]):.1f} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_root)],
                           capture_output=True)
    old_s = sum(min(t) for t in zip(*runs["old"]))
    new_s = sum(min(t) for t in zip(*runs["new"]))
    return {"rev": sha, "repeats": repeats, "cases": len(cases), "old_seconds": old_s, "new_seconds": new_s,
            "ratio": new_s / old_s, "runs": runs, "load_after": os.getloadavg()}


def write(out: Path, settings: dict, load, rows: list[dict], skipped: list[str], done: bool,
          cost: dict | None = None) -> None:
    gap = [g for r in rows for g in r["gap"]]
    worst = max(gap) if gap else float("nan")
    n = len(gap)
    verdicts = sum(1 for r in rows for v in r["fast"] if not math.isnan(v))
    rule_ok = all(all(r["rule_ok"]) for r in rows)
    archs = len({r["name"].split(" (")[0] for r in rows})
    fast_s = sum(r["fast_seconds"] for r in rows)
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "platform": platform.platform(), "load_before": load, "load_after": os.getloadavg()},
              "settings": settings, "reference": REFERENCE, "cases": rows, "images": n, "verdicts": verdicts,
              "architectures": archs, "worst_gap": worst, "target": TARGET, "rule_ok": rule_ok,
              "pass": bool(worst <= TARGET and rule_ok), "fast_seconds": fast_s, "complete": done,
              "skipped": skipped}
    if settings.get("compare"):
        base_s = sum(r.get("baseline_seconds", 0.0) for r in rows)
        bgap = [g for r in rows for g in r.get("baseline_gap", [])]
        result.update(baseline=BASELINE, baseline_seconds=base_s, baseline_worst_gap=max(bgap) if bgap else None,
                      cost_ratio=fast_s / base_s if base_s else None)
    if cost is not None:
        result["cost_against"] = cost
    atomic_write_json(out / "fresh_battery.json", result)
    misses = sorted(((g, r["name"]) for r in rows for g in r["gap"] if g > TARGET), reverse=True)
    md = ["# Fresh battery: the default search against the dense reference on random networks", "",
          f"Command: `python benchmarks/bench_fresh_battery.py --seed {settings['seed']} --architectures "
          f"{settings['architectures']} --transforms {settings['transforms']} --images {settings['images']} --size "
          f"{settings['size']}" + (f" --compare {settings['compare']}" if settings.get("compare") else "")
          + "".join(f" --skip-family {f}" for f in settings.get("skip_family", []))
          + (f" --cost-against {settings['cost_against']}" if settings.get("cost_against") else "") + "`"
          + f". Machine: {result['machine']['cpu']}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
          f"{load[0]:.1f} before, {os.getloadavg()[0]:.1f} after.", "",
          f"**{n} images ({verdicts} with a verdict) over {archs} architectures: worst gap (fast - reference) "
          f"{worst:+.2e}, target <= {TARGET:g}; every optimum keeps the rule's minimum: {rule_ok}. "
          f"{'PASS' if result['pass'] else 'FAIL'}.** Default search {fast_s:.1f} s in all"
          + (f"; without the half-pixel pass, the extra polish starts and the re-search ({BASELINE}) "
             f"{result['baseline_seconds']:.1f} s (cost ratio "
             f"{result['cost_ratio']:.2f}x), worst gap {result['baseline_worst_gap']:+.2e}"
             if settings.get("compare") and result.get("baseline_seconds") else "")
          + f".{'' if done else ' INCOMPLETE: the run stopped after the cases below.'}", ""]
    if cost is not None:
        md += [f"**Cost against the code of commit {cost['rev'][:10]}** (its default search, on the same "
               f"{cost['cases']} cases, fresh one-thread processes run alternately, {cost['repeats']} each, per-case "
               f"minimum): {cost['old_seconds']:.1f} s then, {cost['new_seconds']:.1f} s now, **ratio "
               f"{cost['ratio']:.2f}x** (target <= 2x).", ""]
    md += [
          "Reference grids: " + "; ".join(f"{k}: {v}" for k, v in REFERENCE.items()) + ".", ""]
    if skipped:
        md += [f"Left out ({len(skipped)} cases of the families {', '.join(settings['skip_family'])}; their dense "
               "reference takes 2-6 min per case at 12 x 12 and far longer at 24 x 24 on this machine):", ""]
        md += [f"- {name}" for name in skipped] + [""]
    if misses:
        md += ["Images above the target:", ""] + [f"- {g:+.2e}: {name}" for g, name in misses] + [""]
    md += ["| case | family | maps | fast | reference | worst gap | fast s | reference s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['name']} | {r['family']} | {'x'.join(map(str, r['shape'][1:]))} | "
                  f"{', '.join(f'{v:.4f}' for v in r['fast'])} | {', '.join(f'{v:.4f}' for v in r['reference'])} | "
                  f"{max(r['gap']):+.1e} | {r['fast_seconds']:.1f} | {r['reference_seconds']:.1f} |")
    atomic_write_text(out / "fresh_battery.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
