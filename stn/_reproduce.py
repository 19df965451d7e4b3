"""``stn reproduce``: the MNIST table of Finnveden et al. (2020), with the paper's claims checked.

Trains CNN, STN-C0, STN-C1, STN-DL1 and STN-SL1 under the rotation, scale and translation
protocols on MNIST (and, as far as the mode says, on Fashion-MNIST), evaluates them and writes
``reproduction.md`` and ``reproduction.json``: our test error beside the paper's in every cell,
the canonical-pose statistic, the feature-map alignment errors of STN-C1, and a verdict for each
of the paper's claims. Finished runs are skipped and unfinished ones resumed, so an interrupted
``stn reproduce`` continues where it stopped.

Modes
-----
``quick`` (a 2-core CPU, within an hour) and ``full`` (a GPU): see :data:`MODES`; the report
states every setting.

Claims (as checked)
-------------------
1. *Input-transforming STNs beat STN-C1 under rotation and scale*: STN-C0, STN-DL1 and STN-SL1
   all have a lower test error than STN-C1 under R and under S.
2. *The gap is much smaller under translation*: with ``gap(X) = err(STN-C1) - mean err(STN-C0,
   STN-DL1, STN-SL1)`` under X, ``|gap(T)| < 0.5 * min(gap(R), gap(S))`` (and both positive).
   On the paper's own numbers: gaps 0.28 (R), 0.15 (S), 0.06 (T) points.
3. *Every STN beats the CNN*: under each of R, S and T.

Each comparison also gets a paired standard error from the per-image results on the common test
set, so the report says whether a difference is beyond two standard errors.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from invariance import CheckpointError, load_checkpoint
from invariance.files import atomic_write_json, atomic_write_text

from ._data import get_protocol
from ._train import CHECKPOINT, EVALUATION, RunError, TrainConfig, evaluate, machine_info, read_metrics, train

__all__ = ["PAPER_TABLE", "ARCHS", "TRANSFORMS", "MODES", "Mode", "plan", "check_claims", "reproduce"]

ARCHS: tuple[str, ...] = ("CNN", "STN-C0", "STN-C1", "STN-DL1", "STN-SL1")
TRANSFORMS: tuple[str, ...] = ("rotation", "scale", "translation")
INPUT_STNS: tuple[str, ...] = ("STN-C0", "STN-DL1", "STN-SL1")
SHORT = {"rotation": "R", "scale": "S", "translation": "T"}

#: Test error (%) of Finnveden et al. (2020), MNIST, columns R / S / T.
PAPER_TABLE: dict[str, dict[str, float]] = {
    "CNN": {"rotation": 1.71, "scale": 1.38, "translation": 1.61},
    "STN-C0": {"rotation": 1.08, "scale": 0.85, "translation": 1.10},
    "STN-C1": {"rotation": 1.32, "scale": 0.96, "translation": 1.16},
    "STN-DL1": {"rotation": 1.05, "scale": 0.77, "translation": 1.08},
    "STN-SL1": {"rotation": 0.98, "scale": 0.82, "translation": 1.13},
}


@dataclass(frozen=True)
class Mode:
    """Settings of a reproduction mode (every one is written into the report)."""

    name: str
    sizes: dict  # transform -> image side (None: the protocol's full canvas)
    epochs: dict  # transform -> epochs
    milestones: dict  # transform -> lr milestones
    lr: float = 0.01
    loc_lr_mult: float | dict = 0.1  # one value, or transform -> value
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    limit: int | None = None  # MNIST training / test images used (None: all of the split)
    test_limit: int | None = None
    fashion: tuple = ()  # transforms also run on Fashion-MNIST
    fashion_limit: int | None = None
    fashion_test_limit: int | None = None
    alignment_images: int = 64
    note: str = ""
    extra: dict = field(default_factory=dict)


MODES: dict[str, Mode] = {
    "quick": Mode(
        name="quick",
        sizes={"rotation": None, "scale": 40, "translation": 32},
        epochs={"rotation": 7, "scale": 3, "translation": 4},
        milestones={"rotation": [5], "scale": [2], "translation": [3]},
        lr=0.02, loc_lr_mult={"rotation": 1.0, "scale": 1.0, "translation": 0.03}, batch_size=64,
        alignment_images=32,
        note="CPU quick mode: rotation at full size; translation and scale protocols at reduced resolution "
             "(every length scaled, see below); very few epochs; batch 64 (more SGD steps in the time). "
             "Localisation learning-rate multiplier 1 for rotation and scale (with 0.1 the transformers hardly "
             "moved from the identity in so few steps) but 0.03 for translation: with 1 (and still with 0.1) the "
             "input-warping STNs' predicted shift drifted until the whole image left the field of view and they "
             "ended at chance level (88.65% error; first attempt of this run). No Fashion-MNIST runs (time). "
             "Sized, from the measured 2-core training throughputs, for roughly 15 to 20 minutes on an idle 2-core "
             "CPU (an estimate: the machine that ran it was never idle), so that it stays near an hour on a busy, "
             "shared one. What it can show: that every part runs, and differences of a few points (the scale "
             "column). What it cannot: the rotation and translation claims, whose differences are a few tenths of a "
             "point and whose transformers need far more SGD steps to take off than it gives (`stn reproduce "
             "--budget gpu` on a GPU).",
    ),
    "full": Mode(
        name="full",
        sizes={"rotation": None, "scale": None, "translation": None},
        epochs={"rotation": 50, "scale": 50, "translation": 50},
        milestones={"rotation": [35, 45], "scale": [35, 45], "translation": [35, 45]},
        lr=0.02, loc_lr_mult={"rotation": 1.0, "scale": 1.0, "translation": 0.03}, batch_size=64,
        fashion=TRANSFORMS, alignment_images=256,
        note="Full protocols at full resolution, Fashion-MNIST too; the settings are those of the quick mode with "
             "more epochs. Meant for a GPU: on a 2-core CPU only the rotation column (`--transforms rotation`) "
             "is practical.",
    ),
}


def plan(mode: Mode, data_root: str | None = None, fashion: bool = True,
         transforms: tuple[str, ...] | list[str] = TRANSFORMS) -> list[tuple[str, TrainConfig]]:
    """``[(run name, config)]`` of a mode, MNIST first, for the protocols in ``transforms``.

    >>> [name for name, _ in plan(MODES["quick"], transforms=["rotation"])][:2]
    ['mnist-rotation-CNN', 'mnist-rotation-STN-C0']
    """
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown or not transforms:
        raise ValueError(f"transforms: unknown protocol(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"valid choices: {', '.join(TRANSFORMS)}")
    runs = []
    sets = [("mnist", TRANSFORMS, mode.limit, mode.test_limit)]
    if fashion and mode.fashion:
        sets.append(("fashion-mnist", mode.fashion, mode.fashion_limit, mode.fashion_test_limit))
    for dataset, protocols, limit, test_limit in sets:
        for tr in [t for t in protocols if t in transforms]:
            for arch in ARCHS:
                cfg = TrainConfig(arch=arch, dataset=dataset, transform=tr, epochs=mode.epochs[tr],
                                  size=mode.sizes[tr], batch_size=mode.batch_size, lr=mode.lr,
                                  momentum=mode.momentum, weight_decay=mode.weight_decay,
                                  loc_lr_mult=_per_transform(mode.loc_lr_mult, tr),
                                  milestones=list(mode.milestones[tr]),
                                  seed=0, limit=limit, test_limit=test_limit, eval_every=0, data_root=data_root)
                runs.append((f"{dataset}-{tr}-{arch}", cfg))
    return runs


def _per_transform(value, transform: str):
    return value[transform] if isinstance(value, dict) else value


# ----------------------------------------------------------------------------- claims


def _paired(a: str | None, b: str | None) -> float | None:
    """Paired standard error (fraction) of err(a) - err(b) from per-image correctness strings."""
    if not a or not b or len(a) != len(b):
        return None
    n = len(a)
    wa = sum(1 for x, y in zip(a, b) if x == "0" and y == "1")  # a wrong, b right
    wb = sum(1 for x, y in zip(a, b) if x == "1" and y == "0")
    var = (wa + wb) - (wa - wb) ** 2 / n
    return math.sqrt(max(var, 0.0)) / n


def _cmp(table: dict, correct: dict | None, a: str, b: str, t: str) -> dict:
    """Does ``a`` beat ``b`` under ``t``? (errors in %)"""
    ea, eb = table[a][t], table[b][t]
    se = _paired(correct.get((a, t)), correct.get((b, t))) if correct else None
    d = {"better": a, "worse": b, "transform": t, "errors": [ea, eb], "holds": ea < eb}
    if se is not None:
        d["se_points"] = 100 * se
        d["z"] = (eb - ea) / (100 * se) if se > 0 else (math.inf if eb > ea else 0.0)
        d["significant"] = bool(d["z"] > 2)
    return d


def check_claims(table: dict, correct: dict | None = None, transforms=TRANSFORMS) -> list[dict]:
    """Verdicts of the paper's three claims on a table ``{arch: {transform: error %}}`` (see the module docstring).

    >>> [c["holds"] for c in check_claims(PAPER_TABLE)]
    [True, True, True]
    """
    claims = []
    rs = [t for t in ("rotation", "scale") if t in transforms]
    if rs:
        comps = [_cmp(table, correct, a, "STN-C1", t) for t in rs for a in INPUT_STNS]
        claims.append({"claim": "input-transforming STNs (STN-C0, STN-DL1, STN-SL1) beat STN-C1 under "
                                + " and ".join(rs), "holds": all(c["holds"] for c in comps), "comparisons": comps})
    if set(TRANSFORMS) <= set(transforms):
        gaps = {t: table["STN-C1"][t] - sum(table[a][t] for a in INPUT_STNS) / len(INPUT_STNS) for t in TRANSFORMS}
        holds = gaps["rotation"] > 0 and gaps["scale"] > 0 and abs(gaps["translation"]) < 0.5 * min(
            gaps["rotation"], gaps["scale"])
        claims.append({"claim": "the gap between STN-C1 and the input-transforming STNs is much smaller under "
                                "translation (|gap(T)| < 0.5 min(gap(R), gap(S)), gap = err(STN-C1) - mean err("
                                "STN-C0, STN-DL1, STN-SL1), in points)",
                       "holds": bool(holds), "gaps": gaps})
    comps = [_cmp(table, correct, a, "CNN", t) for t in transforms for a in ARCHS if a != "CNN"]
    claims.append({"claim": "every STN beats the CNN (" + ", ".join(transforms) + ")",
                   "holds": all(c["holds"] for c in comps), "comparisons": comps})
    return claims


# ----------------------------------------------------------------------------- running


def _finished(run: Path, cfg: TrainConfig) -> bool:
    """A finished run of ``cfg`` (a missing or damaged metrics.json is not: train() rewrites it)."""
    try:
        m = read_metrics(run)
    except (OSError, RunError):
        return False
    return m["finished"] and m["config"] == cfg.to_dict()


def _stale(run: Path, cfg: TrainConfig) -> Path | None:
    """Where to move a run folder trained with other settings than ``cfg`` (None: keep it)."""
    try:
        old = load_checkpoint(run / CHECKPOINT)["train_config"]
    except (CheckpointError, KeyError):
        return None  # nothing usable there; train() reports a corrupt checkpoint itself
    if old == cfg.to_dict():
        return None
    k = 1
    while (run.parent / f"{run.name}.old{k}").exists():
        k += 1
    return run.parent / f"{run.name}.old{k}"


def _evaluation(run: Path, arch: str, mode: Mode, device: str) -> dict:
    path = run / EVALUATION
    try:
        ev = json.loads(path.read_text())
        ck_mtime = (run / CHECKPOINT).stat().st_mtime
        if isinstance(ev, dict) and ev.get("finished") and path.stat().st_mtime >= ck_mtime and \
                (arch != "STN-C1" or "feature_alignment" in ev):
            return ev
    except (OSError, ValueError):
        pass
    return evaluate(run, device=device, alignment=arch == "STN-C1", alignment_images=mode.alignment_images)


def reproduce(*, quick: bool = True, out: str | os.PathLike = "runs/reproduce",
              results: str | os.PathLike = "benchmarks/results", device: str = "auto",
              data_root: str | None = None, fashion: bool = True, transforms: tuple[str, ...] | list[str] = TRANSFORMS,
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every training run of the mode, evaluate, and write the report files.

    ``transforms`` restricts the runs to some of the protocols (for example only the rotation
    column); the claims that need a missing protocol are then left out of the report.
    """
    mode = MODES["quick" if quick else "full"]
    runs = plan(mode, data_root, fashion, transforms)
    out, results = Path(out), Path(results)
    out.mkdir(parents=True, exist_ok=True)
    machine_start = machine_info()
    t_start = time.perf_counter()
    cells: dict[str, dict] = {}
    for i, (name, cfg) in enumerate(runs, 1):
        run = out / name
        t0 = time.perf_counter()
        if _finished(run, cfg):
            log(f"[{i}/{len(runs)}] {name}: finished already, skipped")
        else:
            stale = _stale(run, cfg)
            if stale:
                run.rename(stale)
                log(f"[{i}/{len(runs)}] {name}: the existing run used other settings; moved to {stale.name}")
            log(f"[{i}/{len(runs)}] {name}: training ({cfg.epochs} epochs, {cfg.protocol.describe()})")
            train(cfg, run, resume=(run / CHECKPOINT).exists(), device=device, progress=False, log=log)
        ev = _evaluation(run, cfg.arch, mode, device)
        metrics = read_metrics(run)
        cells[name] = {"dataset": cfg.dataset, "transform": cfg.transform, "arch": cfg.arch,
                       "test_error": 100 * ev["test_error"], "test_error_se": 100 * ev["test_error_se"],
                       "n_test": ev["n_test"], "epochs": ev["epochs"], "train_seconds": metrics["seconds"],
                       "eval_seconds": ev.get("seconds", 0.0),
                       "paper": PAPER_TABLE[cfg.arch][cfg.transform] if cfg.dataset == "mnist" else None,
                       "canonical_pose": {k: ev["canonical_pose"][k] for k in
                                          ("quantity", "unit", "mean_spread", "applied_only_mean_spread")},
                       "feature_alignment": ev.get("feature_alignment"), "correct": ev["correct"],
                       "protocol": ev["protocol"], "test_data": ev["test_data"], "train_data": metrics["train_data"],
                       "images_per_s": metrics["history"][-1].get("images_per_s") if metrics["history"] else None}
        log(f"[{i}/{len(runs)}] {name}: test error {cells[name]['test_error']:.2f}% "
            f"({time.perf_counter() - t0:.0f} s; {time.perf_counter() - t_start:.0f} s in all)")
    report = _report(mode, runs, cells, time.perf_counter() - t_start, device)
    report["machine_at_start"] = machine_start
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / "reproduction.json", report)
    atomic_write_text(results / "reproduction.md", _markdown(report))
    log(f"wrote {results / 'reproduction.md'} and {results / 'reproduction.json'}")
    return report


def _tables(cells: dict, dataset: str) -> tuple[dict, dict]:
    table: dict = {}
    correct: dict = {}
    for c in cells.values():
        if c["dataset"] == dataset:
            table.setdefault(c["arch"], {})[c["transform"]] = c["test_error"]
            correct[(c["arch"], c["transform"])] = c["correct"]
    return table, correct


def _report(mode: Mode, runs, cells: dict, seconds: float, device: str) -> dict:
    datasets = []
    for ds in ("mnist", "fashion-mnist"):
        table, correct = _tables(cells, ds)
        if not table:
            continue
        transforms = [t for t in TRANSFORMS if all(t in table.get(a, {}) for a in ARCHS)]
        datasets.append({"dataset": ds, "table": table, "transforms": transforms,
                         "claims": check_claims(table, correct, transforms)})
    cfg0 = {t: cfg for _, cfg in runs for t in [cfg.transform]}
    protocols = {t: get_protocol(t, mode.sizes[t]).describe() for t in TRANSFORMS if t in cfg0}
    return {
        "mode": mode.name, "note": mode.note, "seconds": seconds, "machine": machine_info(),
        "device": device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"),
        "settings": {"epochs": mode.epochs, "milestones": mode.milestones, "lr": mode.lr,
                     "loc_lr_mult": mode.loc_lr_mult, "batch_size": mode.batch_size, "momentum": mode.momentum,
                     "weight_decay": mode.weight_decay, "sizes": mode.sizes,
                     "families": {t: cfg0[t].resolved_family for t in cfg0},
                     "fashion": list(mode.fashion), "fashion_limit": mode.fashion_limit,
                     "fashion_test_limit": mode.fashion_test_limit},
        "protocols": protocols, "paper_table": PAPER_TABLE,
        "paper_claims": check_claims(PAPER_TABLE),
        "datasets": datasets,
        "runs": {k: {kk: vv for kk, vv in v.items() if kk != "correct"} for k, v in cells.items()},
    }


def _fmt_per_transform(v) -> str:
    return ", ".join(f"{t} {x}" for t, x in v.items()) if isinstance(v, dict) else str(v)


def _load(m: dict | None) -> str:
    la = (m or {}).get("load_average")
    return "/".join(f"{v:.1f}" for v in la) if la else "unknown"


def verdict(c: dict) -> str:
    return "**holds**" if c["holds"] else "**does not hold**"


def comparison_line(c: dict) -> str:
    s = f"{c['better']} {c['errors'][0]:.2f} {'<' if c['holds'] else '>='} {c['worse']} {c['errors'][1]:.2f}"
    if "z" in c:
        z = c["z"]
        s += f" (z = {z:.1f}{', within 2 SE' if abs(z) < 2 else '' if z > 0 else ', significantly the other way'})"
    return s


def _per_transform_dict(v) -> dict:
    return v if isinstance(v, dict) else {t: v for t in TRANSFORMS}


def _md_errors(r: dict, ds: dict) -> list[str]:
    """The test-error table of one data set (the paper's in brackets) and the claims' verdicts."""
    mn = ds["dataset"] == "mnist"
    ts = ds["transforms"]
    lines: list[str] = []
    lines += [f"## Test error (%) on {ds['dataset']}" + (" (ours, paper in brackets)" if mn else ""), "",
              "| architecture | " + " | ".join(f"{t} ({SHORT[t]})" for t in ts) + " |",
              "|---|" + "---|" * len(ts)]
    for a in ARCHS:
        row = []
        for t in ts:
            cell = next(v for v in r["runs"].values() if v["dataset"] == ds["dataset"] and v["arch"] == a
                        and v["transform"] == t)
            s = f"{cell['test_error']:.2f} +- {cell['test_error_se']:.2f}"
            if mn:
                s += f" ({PAPER_TABLE[a][t]:.2f})"
            row.append(s)
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    n_test = next(v["n_test"] for v in r["runs"].values() if v["dataset"] == ds["dataset"])
    lines += ["", f"+- is the binomial standard error of our number (n = {n_test} test images). The paper's "
              "differences between the STN variants are 0.03 to 0.34 points; differences that small are below "
              "the resolution of a test set this size, so a comparison with z < 2 (paired, from the per-image "
              "results) is no evidence either way.", "", "### The paper's claims", ""]
    for c in ds["claims"]:
        lines.append(f"* {c['claim']}: {verdict(c)}.")
        if "gaps" in c:
            lines.append("  Gaps: " + ", ".join(f"{SHORT[t]} {g:+.2f}" for t, g in c["gaps"].items()) + " points.")
        for comp in c.get("comparisons", []):
            lines.append(f"  - {SHORT[comp['transform']]}: {comparison_line(comp)}")
    lines.append("")
    return lines


def _md_pose(r: dict, ds: dict) -> list[str]:
    """The canonical-pose table of one data set."""
    ts = ds["transforms"]
    lines: list[str] = []
    lines += ["### Canonical pose (mean over classes of the per-class spread of the pose reached; "
              "data alone = the CNN)", "", "| architecture | " + " | ".join(
                  f"{t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for a in ARCHS:
        row = []
        for t in ts:
            cell = next(v for v in r["runs"].values() if v["dataset"] == ds["dataset"] and v["arch"] == a
                        and v["transform"] == t)
            cp = cell["canonical_pose"]
            row.append(f"{cp['mean_spread']:.3g}")
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    units = {t: next(v for v in r["runs"].values() if v["dataset"] == ds["dataset"] and v["transform"] == t)
             ["canonical_pose"]["unit"] for t in ts}
    lines += ["", "Units: " + "; ".join(f"{t}: {u}" for t, u in units.items()) + ". A spread close to the "
              "CNN's (the data's own) means that the transformers hardly moved from the identity, so the "
              "STN's error differs from the CNN's for other reasons than alignment.", ""]
    return lines


def _md_alignment(r: dict, ds: dict) -> list[str]:
    """STN-C1's feature-map alignment table of one data set (when measured)."""
    ts = ds["transforms"]
    lines: list[str] = []
    fa_rows = [(t, v["feature_alignment"]) for t in ts for v in r["runs"].values()
               if v["dataset"] == ds["dataset"] and v["arch"] == "STN-C1" and v["transform"] == t
               and v["feature_alignment"]]
    if fa_rows:
        lines += ["### STN-C1: alignment of its transformed feature maps (alignment engine)", "",
                  "Pairs (f, T_h f) of test digits without clutter, T_h drawn from the protocol; maps after the "
                  "first layer (central disk mask). stn = what the trained STN-C1 achieves, "
                  "||S(F_h) - S(F)||^2 / ||S(F)||^2; best spatial = min over warps g of "
                  "||W_g F_h - F||^2 / ||F||^2 (what any spatial transformer of these maps could achieve at "
                  "best); expected = the same for g = h^-1; no warp = ||F_h - F||^2 / ||F||^2; "
                  "input floor = best spatial at the input (interpolation only). Means with bootstrap 95% "
                  "intervals.", "",
                  "| transform | search | stn | best spatial | expected | no warp | input floor |",
                  "|---|---|---|---|---|---|---|"]
        for t, fa in fa_rows:
            def f(k, fa=fa):
                return f"{fa[k]['mean']:.3f} [{fa[k]['ci95'][0]:.3f}, {fa[k]['ci95'][1]:.3f}]"
            lines.append(f"| {t} | {fa['search_family']} | {f('stn_error')} | {f('spatial_error')} | "
                         f"{f('expected_error')} | {f('invariance_error')} | {f('input_floor')} |")
        lines.append("")
    return lines


def _markdown(r: dict) -> str:
    st = r["settings"]
    ran = r["protocols"]  # the protocols this report has runs of
    loc_mult = {t: v for t, v in _per_transform_dict(st["loc_lr_mult"]).items() if t in ran}
    lines = [
        "# Reproduction: STN architectures on transformed MNIST (Finnveden et al. 2020, MNIST table)",
        "",
        f"Written by `stn reproduce{' --quick' if r['mode'] == 'quick' else ''}`. **Mode: {r['mode']}** "
        f"({r['note']}) Device: {r['device']}; machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, "
        f"{r['machine']['threads']} torch threads, torch {r['machine']['torch']}, "
        f"OMP_WAIT_POLICY={r['machine'].get('omp_wait_policy')}. "
        f"Compute time of all runs (training + evaluation, summed over runs, including any earlier interrupted "
        f"invocation): {sum(v['train_seconds'] + v.get('eval_seconds', 0.0) for v in r['runs'].values()) / 60:.1f} "
        f"min; wall time of the invocation that wrote this report: {r['seconds'] / 60:.1f} min (runs finished "
        "by an earlier invocation are skipped). "
        "The machine is shared: load average "
        f"{_load(r.get('machine_at_start'))} at the start and {_load(r['machine'])} at the end "
        "(1, 5, 15 min; 2 cores).",
        "",
        "## Data and training",
        "",
    ]
    for d in r["protocols"].values():
        lines.append(f"* {d}")
    mn_runs = [v for v in r["runs"].values() if v["dataset"] == "mnist"]
    if mn_runs:
        lines.append(f"* MNIST data: {mn_runs[0]['train_data']} for training; {mn_runs[0]['test_data']} for testing "
                     "(one fixed transformation per test image). The paper trained on the 60,000 MNIST training "
                     "images; only the 10,000 test images are available here, hence 8,000 / 2,000.")
        fm = [v for v in r["runs"].values() if v["dataset"] == "fashion-mnist"]
        if fm:
            lines.append(f"* Fashion-MNIST data: {fm[0]['train_data']} / {fm[0]['test_data']}; "
                         f"transforms: {', '.join(st['fashion'])}.")
    lines += [
        f"* Epochs: {', '.join(f'{t} {e}' for t, e in st['epochs'].items() if t in ran)}; SGD, batch "
        f"{st['batch_size']}, lr {st['lr']}, momentum {st['momentum']}, weight decay {st['weight_decay']}, lr x0.1 "
        f"after epochs {', '.join(f'{t} {m}' for t, m in st['milestones'].items() if t in ran)}; localisation lr "
        f"multiplier {_fmt_per_transform(loc_mult)}; seed 0.",
        f"* Transformation family predicted: {', '.join(f'{t} -> {f}' for t, f in st['families'].items())}.",
        "* Localisation networks: STN-C0: conv 5x5 32 -> pool -> ReLU -> conv 5x5 32 -> pool -> ReLU -> FC 32 -> "
        "FC (zero-initialised); STN-C1 / STN-SL1: the same head on the 64 feature maps after the classifier's "
        "first layer (its own, shared); STN-DL1: a fresh copy of that first layer followed by the head.",
        "",
    ]
    for ds in r["datasets"]:
        lines += _md_errors(r, ds) + _md_pose(r, ds) + _md_alignment(r, ds)
    lines += ["## The paper's claims on the paper's own numbers", ""]
    for c in r["paper_claims"]:
        lines.append(f"* {c['claim']}: {verdict(c)}.")
    lines += ["", "## Runs", "", "| run | epochs | train time (s) | evaluation time (s) | img/s (last epoch) |",
              "|---|---|---|---|---|"]
    for k, v in r["runs"].items():
        lines.append(f"| {k} | {v['epochs']} | {v['train_seconds']:.0f} | {v.get('eval_seconds', 0.0):.0f} | "
                     f"{v['images_per_s'] or 0:.0f} |")
    lines.append("")
    return "\n".join(lines)
