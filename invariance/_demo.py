"""``invariance demo``: the paper's central result, produced by the toolkit itself, offline.

1. **The W/M proof** on the analytic toy network ``toy-wm``: after a 180° rotation a W scene
   becomes an M scene, so no spatial warp of the feature maps aligns them (spatial error
   >= 0.9) while a warp plus the W <-> M channel swap does (permutation error <= 0.05).
2. **A real CNN on real digits**: the small CNN shipped with the package (trained on rotated
   MNIST by the project's own ``stn`` code) on the shipped MNIST test digits, measured layer by
   layer under a rotation, a rescaling and a translation, with the interpolation floor and the
   random-pair null. Translations align at every depth; rotations and rescalings do not align
   beyond the input.

It prints the tables, shows progress, and writes ``report.json`` (both parts), ``report.csv``,
``summary.md`` and the figures (``demo.png``, the one-figure summary, and per-part figures).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._measure import measure
from ._models import load_model
from ._record import SCHEMA
from ._report import Report
from ._search import SearchConfig
from ._transform import parse_transforms
from .files import atomic_write, atomic_write_json, atomic_write_text, check_output_dir, describe_files

__all__ = ["run_demo", "WM_SPATIAL_MIN", "WM_PERMUTATION_MAX", "CNN_TRANSFORMS"]

WM_SPATIAL_MIN = 0.9
WM_PERMUTATION_MAX = 0.05
CNN_TRANSFORMS = "rotation:45; scale:0.7; translation:4,-4"
CANVAS = 48  # digits are centred on a 48x48 canvas: rotated / rescaled content stays in view, and the deepest
# layer (receptive-field radius 11.5) keeps an interior of 6 x 6 positions, of which a rotation by 45 degrees
# leaves 12 in view (at 40 px: 4 x 4 and 3.7, no verdict)


def _digits(n: int, seed: int) -> torch.Tensor:
    from ._zoo import load_digits

    imgs, labels = load_digits()
    rng = np.random.default_rng(seed)
    per = max(1, n // 10)
    idx = np.concatenate([rng.choice(np.flatnonzero(labels.numpy() == c), per, replace=False) for c in range(10)])
    x = imgs[torch.as_tensor(np.sort(idx))].float().div(255).unsqueeze(1)
    pad = (CANVAS - 28) // 2
    return F.pad(x, (pad, pad, pad, pad))


def _cnn():
    try:
        return load_model("mnist-cnn"), "mnist-cnn (shipped, trained on rotated MNIST)"
    except FileNotFoundError:
        return load_model("mnist-cnn-random"), "mnist-cnn-random (shipped weights missing: random init)"


def run_demo(out: str | Path = "demo-report", *, quick: bool = False, device: str | torch.device = "cpu",
             seed: int = 0, progress: bool | None = None) -> dict:
    """Run both parts, print the tables and write the report folder; returns the verdicts."""
    t0 = time.time()
    out = check_output_dir(out, "out")  # before any computation
    # sized to finish in about 2 minutes on 2 CPU cores (the quick mode in about half that)
    n_wm, n_cnn = (10, 20) if quick else (16, 32)
    cfg = SearchConfig.preset("demo-quick" if quick else "demo", seed=seed)
    n_boot = 200 if quick else 1000

    print("== 1. The W/M proof: toy-wm under a 180 degree rotation ==", flush=True)
    from .toys import make_images

    wm_model = load_model("toy-wm").to(device)
    scenes = make_images("glyphs", n_wm, seed=seed).to(device)
    wm = measure(wm_model, scenes, "rotation:180", layers="detect,rectify,pool",
                 channels=("spatial", "permutation"), config=cfg, n_boot=n_boot, seed=seed, progress=progress,
                 model_name="toy-wm")
    print(wm.table(), flush=True)

    print("\n== 2. A CNN on MNIST digits: rotation, scaling, translation, layer by layer ==", flush=True)
    cnn, cnn_name = _cnn()
    cnn = cnn.to(device)
    digits = _digits(n_cnn, seed).to(device)
    rep = measure(cnn, digits, parse_transforms(CNN_TRANSFORMS), layers="input,conv1,relu1,conv2,relu2",
                  channels=("spatial", "permutation", "linear"), config=cfg, n_boot=n_boot, seed=seed,
                  progress=progress, model_name=cnn_name)
    print(rep.table(), flush=True)

    verdicts = _verdicts(wm, rep)
    # report.json is written last and lists every other file with its sha256: a run killed half-way
    # leaves a folder that Report.from_json refuses instead of a silent mix of two runs
    written = [*wm.save(out / "toy-wm").values(), *rep.save(out / "cnn").values()]
    merged = {
        "schema": SCHEMA,
        "reports": {"toy-wm": wm.to_dict(), "cnn": rep.to_dict()},  # each as its own report.json holds it
        "meta": {"quick": quick, "seconds": round(time.time() - t0, 1)},
        "verdicts": verdicts,
    }
    from ._report import json_safe, write_csv

    written.append(write_csv(out / "report.csv", [wm, rep]))
    written.append(_figure(wm, rep, wm_model, scenes, out / "demo.png"))
    written.append(atomic_write_text(out / "summary.md",
                                     _summary(wm, rep, verdicts, cnn_name, quick, time.time() - t0)))
    merged = json_safe(merged)
    merged["files"] = describe_files(written, out)
    atomic_write_json(out / "report.json", merged)
    print("\n" + "\n".join(f"[{'PASS' if v['holds'] else 'FAIL'}] {v['claim']}" for v in verdicts.values()))
    print(f"\nwrote {out}/report.json, report.csv, summary.md, demo.png ({time.time() - t0:.0f} s)")
    return verdicts


def _verdicts(wm: Report, rep: Report) -> dict:
    after = [r for r in wm.records if r.layer in ("rectify", "pool")]
    v = {
        "wm_spatial": {
            "claim": f"toy-wm, rotation 180: spatial error >= {WM_SPATIAL_MIN} after the detectors",
            "holds": bool(after) and all(r.errors.spatial.mean >= WM_SPATIAL_MIN for r in after),
            "values": {r.layer: r.errors.spatial.mean for r in after},
        },
        "wm_permutation": {
            "claim": f"toy-wm, rotation 180: permutation error <= {WM_PERMUTATION_MAX} (W <-> M swap)",
            "holds": bool(after) and all(r.errors.permutation.mean <= WM_PERMUTATION_MAX
                                         and r.channels.orbits == ((0, 1),) for r in after),
            "values": {r.layer: r.errors.permutation.mean for r in after},
        },
    }
    deep = "relu2"
    at = {r.transform.family: r for r in rep.records if r.layer == deep}  # one transformation per family
    moved = at["translation"].errors.spatial
    v["cnn_rotation_scale"] = {
        "claim": f"CNN, deepest layer ({deep}): rotation and scaling leave a spatial error above the "
                 "translation's and the interpolation floor",
        # written so that a NaN (no verdict) anywhere makes the claim fail, never hold
        "holds": all(at[f].errors.spatial.ci[0] > moved.ci[1]
                     and at[f].errors.spatial.ci[0] > at[f].calibration.floor.mean for f in ("rotation", "scale")),
        "values": {at[f].transform.label: at[f].errors.spatial.mean for f in ("rotation", "scale", "translation")},
    }
    return v


def _summary(wm: Report, rep: Report, verdicts: dict, cnn_name: str, quick: bool, seconds: float) -> str:
    lines = [
        "# invariance demo", "",
        f"Mode: {'quick' if quick else 'full'}; {wm.meta['n_images']} W/M scenes, {rep.meta['n_images']} MNIST "
        f"digits (48x48 and {CANVAS}x{CANVAS} canvases); {seconds:.0f} s.", "",
        "![summary](demo.png)", "",
        "## Verdicts", "",
    ]
    lines += [f"- **{'PASS' if v['holds'] else 'FAIL'}**: {v['claim']} "
              f"({', '.join(f'{k} {x:.3f}' for k, x in v['values'].items())})" for v in verdicts.values()]
    lines += ["", "## 1. toy-wm, rotation 180", "", "```", wm.table(), "```", "",
              f"## 2. {cnn_name}", "", "```", rep.table(), "```", "",
              "Errors are normalised squared errors on the central disk of each layer (mean [95% bootstrap CI]); "
              "`null` is the random-pair null, `floor` the interpolation floor (the input under the same search).",
              ""]
    return "\n".join(lines)


def _figure(wm: Report, rep: Report, wm_model, scenes, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 6.6))
    gs = fig.add_gridspec(2, 6, height_ratios=[1, 1.25])
    # top row: a W scene, its W / M channels; the rotated scene, its W / M channels
    wm_model = wm_model.cpu()
    with torch.no_grad():
        fired = wm_model(scenes.cpu())[:, 0].flatten(1).amax(1) > 0
    i = int(fired.nonzero()[0, 0]) if bool(fired.any()) else 0  # a W scene
    x = scenes[i : i + 1].cpu()
    xr = torch.rot90(x, 2, dims=(-2, -1))
    with torch.no_grad():
        # rectified detections are single peaks: dilate them (display only) so they are visible
        f = F.max_pool2d(wm_model(x), 5, 1, 2)[0]
        fr = F.max_pool2d(wm_model(xr), 5, 1, 2)[0]
    panels = [(x[0, 0], "a W scene"), (f[0], "W detector"), (f[1], "M detector"),
              (xr[0, 0], "rotated 180° (an M)"), (fr[0], "W detector"), (fr[1], "M detector")]
    for i, (img, title) in enumerate(panels):
        ax = fig.add_subplot(gs[0, i])
        ax.imshow(img.numpy(), cmap="gray" if i in (0, 3) else "magma", vmin=0)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    # bottom left: W/M errors per layer
    ax = fig.add_subplot(gs[1, :2])
    layers = [r.layer for r in wm.records]
    xs = np.arange(len(layers))
    for j, (kind, lab) in enumerate((("spatial", "spatial warp"), ("permutation", "warp + channel swap"))):
        vals = [getattr(r.errors, kind).mean for r in wm.records]
        ci = np.array([getattr(r.errors, kind).ci for r in wm.records]).T
        ax.bar(xs + (j - 0.5) * 0.38, vals, 0.38, label=lab,
               yerr=[np.array(vals) - ci[0], ci[1] - np.array(vals)], capsize=3)
    ax.axhline(WM_SPATIAL_MIN, color="k", ls=":", lw=1, label=f"verdict: spatial >= {WM_SPATIAL_MIN:g}")
    ax.set_xticks(xs, layers)
    ax.set_ylabel("alignment error")
    ax.set_title("toy-wm, rotation 180°: no warp aligns W with M")
    ax.legend(fontsize=8, loc="lower right")
    # bottom right: CNN spatial error by layer for R, S, T
    ax = fig.add_subplot(gs[1, 2:])
    for tr in rep.transforms:
        recs = rep.select(transform=tr)
        xs = np.arange(len(recs))
        ys = [r.errors.spatial.mean for r in recs]
        ci = np.array([r.errors.spatial.ci for r in recs]).T
        line, = ax.plot(xs, ys, marker="o", label=f"{tr.label}: best warp")
        ax.fill_between(xs, ci[0], ci[1], color=line.get_color(), alpha=0.2)
        ax.plot(xs, [r.calibration.null.mean for r in recs], color=line.get_color(), ls=":", lw=1)
    ax.plot([], [], color="grey", ls=":", label="random-pair null")
    ax.set_xticks(np.arange(len(recs)), [r.layer for r in recs])
    ax.set_ylabel("spatial alignment error")
    ax.set_title("CNN on MNIST digits: only the translation aligns in depth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
    return path
