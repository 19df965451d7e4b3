"""Benchmark: translation-only ``align`` against scikit-image's ``phase_cross_correlation``, side by side.

    .venv-models/bin/pip install scikit-image   # an optional comparison: not a dependency
    .venv-models/bin/python benchmarks/bench_translation.py [--images 8] [--sizes 32,64,128] [--out DIR]

What a user would otherwise write for a pure translation: scikit-image's
``skimage.registration.phase_cross_correlation``, unmasked (``normalization=None``, a plain
cross-correlation peak: the least-squares optimum when the overlap is the whole map) and masked
(``reference_mask``/``moving_mask``, Padfield's masked normalised cross-correlation), one call per
image. Ours: :func:`invariance.align` with ``family="translation"`` on the same maps, the whole
batch in one call, the default settings (FFT over every integer shift, exact scoring; the
refinement only for images whose integer optimum is not exact). The maps are smooth random
single-channel images, content inside a disk, and the moving map is the reference shifted by a
known integer offset per image; all three must return that offset. Each time is the median of
``--repeats`` runs after a warm-up, one torch thread, scikit-image on numpy (one thread as well:
``OMP_NUM_THREADS=1`` is set before numpy loads). Target (issue "near the limit"): ``align`` within
1.5x of the unmasked ``phase_cross_correlation``. Written to ``benchmarks/results/translation.{json,md}``
with the machine and the load average.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import machine, write_results  # noqa: E402
from bench_search import smooth_maps  # noqa: E402

from invariance import align  # noqa: E402


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def _timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return _median(times), out


def bench_size(s: int, b: int, repeats: int) -> dict:
    from skimage.registration import phase_cross_correlation

    ref = smooth_maps(b, 1, s, s, seed=s).double()
    g = torch.Generator().manual_seed(s)
    shifts = torch.randint(-s // 8, s // 8 + 1, (b, 2), generator=g)
    mov = torch.stack([torch.roll(ref[i], (int(dy), int(dx)), (-2, -1)) for i, (dy, dx) in enumerate(shifts)])
    refs, movs = ref[:, 0].numpy(), mov[:, 0].numpy()
    ones = torch.ones(s, s, dtype=torch.float64).numpy() > 0

    def pcc():
        return [phase_cross_correlation(refs[i], movs[i], normalization=None)[0] for i in range(b)]

    def pcc_masked():
        return [phase_cross_correlation(refs[i], movs[i], reference_mask=ones, moving_mask=ones)[0] for i in range(b)]

    def ours():
        return align(ref, mov, "translation")

    t_pcc, out_pcc = _timed(pcc, repeats)
    t_masked, out_masked = _timed(pcc_masked, repeats)
    t_ours, out_ours = _timed(ours, repeats)
    want = -shifts.double()  # (dy, dx) taking the moving map back onto the reference
    ours_shift = out_ours.matrices[:, [1, 0], 2].cpu() * (s / 2)  # normalised -> pixels (square maps)
    pcc_shift = torch.tensor([list(v) for v in out_pcc], dtype=torch.float64)
    masked_shift = torch.tensor([list(v) for v in out_masked], dtype=torch.float64)
    return {
        "size": s, "images": b, "pcc_seconds": t_pcc, "pcc_masked_seconds": t_masked, "align_seconds": t_ours,
        "align_over_pcc": t_ours / t_pcc, "align_over_pcc_masked": t_ours / t_masked,
        "align_same_shifts": bool(torch.allclose(ours_shift, want, atol=1e-6)),
        "pcc_same_shifts": bool(torch.allclose(pcc_shift, want, atol=1e-6)),
        "pcc_masked_same_shifts": bool(torch.allclose(masked_shift, want, atol=1e-6)),
        "align_errors_max": float(out_ours.errors.max()),
    }


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = ["# Translation: `align` against scikit-image's `phase_cross_correlation`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (1 thread), scikit-image "
             f"{out['skimage']}. Load average before {out['load_before']}, after {out['load_after']}.", "",
             f"Command: `{out['command']}`", "",
             "Smooth random single-channel float64 maps, each the reference moved by a known integer offset "
             "(circularly); median of "
             f"{out['repeats']} runs after a warm-up. *pcc*: `phase_cross_correlation(normalization=None)` per "
             "image; *masked pcc*: with `reference_mask`/`moving_mask` (all ones); *align*: "
             "`invariance.align(ref, mov, \"translation\")`, the whole batch in one call, default settings. "
             "*same*: every image's offset found (pcc / masked pcc / align).", "",
             "| maps (B x H x W) | pcc | masked pcc | align | align / pcc | align / masked pcc | same |",
             "|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        lines.append(f"| {r['images']} x {r['size']} x {r['size']} | {r['pcc_seconds'] * 1e3:.1f} ms "
                     f"| {r['pcc_masked_seconds'] * 1e3:.1f} ms | {r['align_seconds'] * 1e3:.1f} ms "
                     f"| **{r['align_over_pcc']:.2f}x** | {r['align_over_pcc_masked']:.2f}x "
                     f"| {r['pcc_same_shifts']} / {r['pcc_masked_same_shifts']} / {r['align_same_shifts']} |")
    worst = max(r["align_over_pcc"] for r in out["results"])
    lines += ["", f"- `align` within 1.5x of the unmasked `phase_cross_correlation`: **{worst <= 1.5}** "
              f"(worst {worst:.2f}x).",
              "- `align` computes more than the peak: the error of every integer shift over the comparison "
              "region, its exact score, the overlap rule, and a result per image with its warp and error; "
              "the unmasked pcc assumes a circular shift and returns the peak only."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    try:
        import skimage
    except ImportError:
        raise SystemExit("bench_translation: error: scikit-image is not installed (pip install scikit-image); "
                         "it is the comparison, not a dependency") from None
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = [bench_size(int(s), args.images, args.repeats) for s in args.sizes.split(",")]
    out = {"machine": machine(), "skimage": skimage.__version__, "repeats": args.repeats,
           "command": "python benchmarks/bench_translation.py " + " ".join(sys.argv[1:]),
           "load_before": [round(x, 2) for x in load_before],
           "load_after": [round(x, 2) for x in os.getloadavg()], "results": results}
    write_results(args.out, "translation", out, markdown(out))


if __name__ == "__main__":
    main()
