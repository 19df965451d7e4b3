"""The GPU suite's parts, their time caps, and the plan: each part's time estimated from its op counts.

    python benchmarks/suite_plan.py [--tiny] [--device cpu|cuda] [--cap PART=SECONDS ...] [--json PATH]

``benchmarks/gpu_suite.sh`` runs the parts listed in :data:`PARTS`, each under its cap (the caps
of the GPU run add up to :data:`LEASE_SECONDS`, 10 minutes, so the suite fits its lease by
construction), and calls this module first, on the device, as its calibration step
(``gpu_suite.sh --plan`` prints the plan and stops). The plan:

1. measures the device's prices (``benchmarks/_ops.py``: seconds per operator launch and per
   host synchronisation, FFT and matmul FLOP/s, memory bandwidth);
2. counts the operators, FFT and dense FLOPs and bytes of each part's work by running a
   scaled-down instance of it on the device under torch's dispatcher (one image where the work is
   linear in the images, a sample of the per-candidate loop's candidates, one SGD step) and
   scales the counts to the part's full size;
3. prices the counts: the estimated seconds of each part; a part whose time is fixed by
   construction (the budgeted reproduction trains for its budget's seconds) adds that time; the
   CUDA tests are not estimated (bounded by their cap);
4. sizes the one part whose size is free, the resnet50 search, from its work **timed** on the
   device (two calls of its measure, on 2 and 6 images after a warm-up: :func:`time_resnet50`)
   rather than counted: the most images (at most 1,000) whose estimate stays within 70% of its cap.

The estimate of the counted work is a sum of the prices (``_ops.seconds``), which errs long on a
GPU that overlaps launches with compute; what the model leaves out (loading data, writing
reports and figures, Python between the operators) makes a part's estimate short. On the tiny
run on an idle 2-core CPU the measured times were 0.8-2.2x the estimates (the reproduction the
furthest: its data loading and figures). The caps, not the estimates, bound the suite; the suite
records each part's measured time beside its estimate (``suite.md``), so the model can be
checked on every run. The plan's exit status is 1 when the estimated total exceeds the lease.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _ops  # noqa: E402

LEASE_SECONDS = 600
"""The GPU suite's whole time: 10 minutes of a 15-minute lease (the first lease's machine started in 46 s)."""

RESNET50_IMAGES = 1000
"""The resnet50 part's target size (issue "near the limit": 1,000 images x 360 angles < 60 s)."""

RESNET50_FILL = 0.7
"""The share of its cap the sized resnet50 part may be estimated to take (margin for the model's error)."""


@dataclass(frozen=True)
class Part:
    """One part of the suite: its name, its cap in seconds (GPU run, tiny run) and what it runs."""

    name: str
    cap: int
    tiny_cap: int
    what: str


PARTS = (
    Part("plan", 60, 300, "this plan: the device's prices, the op counts, the sizes"),
    Part("cuda-tests", 75, 600, "every test that takes the device fixture, and tests/test_cuda.py, on CUDA"),
    Part("search-bench", 30, 600, "benchmarks/bench_search.py --quick: the search against the per-candidate loop"),
    Part("fft-bound", 20, 600, "benchmarks/bench_fft_bound.py: the search against its bare FFTs, resnet50 sizes"),
    Part("train-bench", 30, 600, "benchmarks/bench_train.py: the five architectures together against the loop"),
    Part("reproduction", 290, 600, "stn reproduce --budget gpu: the paper's three columns"),
    Part("resnet50", 90, 600, "benchmarks/bench_resnet50.py: resnet50 layer2, 360 angles, sized images"),
)
assert sum(p.cap for p in PARTS) <= LEASE_SECONDS


def caps(tiny: bool, overrides: dict[str, int]) -> dict[str, int]:
    """Each part's cap in seconds, with ``--cap PART=SECONDS`` overrides.

    >>> caps(False, {})["resnet50"], sum(caps(False, {}).values())
    (90, 595)
    >>> caps(True, {"fft-bound": 3})["fft-bound"]
    3
    """
    out = {p.name: p.tiny_cap if tiny else p.cap for p in PARTS}
    bad = sorted(set(overrides) - set(out))
    if bad:
        raise SystemExit(f"suite_plan: error: --cap: unknown part {bad[0]!r}; valid parts: {', '.join(out)}")
    return {**out, **overrides}


def parse_cap(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--cap: expected PART=SECONDS with a positive integer, got {text!r}")
    return name, int(value)


# ----------------------------------------------------------------------------- the parts' work, counted


def _search_work(b: int, c: int, s: int, cfg, dev, family: str = "rigid") -> _ops.OpCount:
    """One ``align`` of ``b`` smooth ``c x s x s`` maps rotated by 33 degrees (as the benchmarks do)."""
    from bench_search import smooth_maps

    from invariance import align, warp
    from invariance import geometry as G

    ref = smooth_maps(b, c, s, s, 0, dev)
    mov = warp(ref, G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([33.0, 1.7, -2.2])), (s, s)).to(dev))
    mask = torch.ones(s, s, device=dev)
    return _ops.count(lambda: align(ref, mov, family, mask=mask, config=cfg))


def _loop_work(b: int, c: int, s: int, n_angles: int, candidates: int, dev) -> _ops.OpCount:
    """The per-candidate loop over ``candidates`` candidates, from a count over a sample of 8."""
    from bench_search import candidate_matrices, loop_search, smooth_maps

    ref = smooth_maps(b, c, s, s, 0, dev)
    mats = candidate_matrices(n_angles, s, s, torch.float32, dev)
    mask = torch.ones(s, s, device=dev)
    return _ops.count(lambda: loop_search(ref, ref, mats, mask, limit=8)) * (candidates / 8)


def work_search_bench(tiny: bool, dev) -> _ops.OpCount:
    """bench_search.py --quick (--tiny): the speed part (loop and coarse search, ``repeats`` times, one
    refined search) and the memory child (one coarse search, a 24-candidate loop sample)."""
    from invariance import SearchConfig

    b, c, s, a = (2, 4, 8, 2) if tiny else (8, 32, 16, 12)
    repeats = 1 if tiny else 3
    coarse = SearchConfig(n_angles=a, refine_steps=0, top_k=1, subpixel_top=0)
    n = a * (2 * s - 1) ** 2
    speed = (_search_work(b, c, s, coarse, dev) * (repeats + 1) + _loop_work(b, c, s, a, n * repeats + 4, dev)
             + _search_work(b, c, s, SearchConfig(n_angles=a, top_k=3, refine_steps=40), dev))
    mb, mc, ms, ma = (2, 4, 12, 4) if tiny else (16, 64, 28, 90)
    mem = (_search_work(1, mc, ms, SearchConfig(n_angles=ma, refine_steps=0, top_k=1, subpixel_top=0), dev) * mb
           + _loop_work(mb, mc, ms, ma, 24, dev))
    return speed + mem


def work_fft_bound(tiny: bool, dev) -> _ops.OpCount:
    """bench_fft_bound.py: per map size, the recorded coarse search, ``repeats + 1`` coarse and default
    searches and as many bare-FFT passes (priced as coarse searches: errs long), and the loop sample."""
    from bench_fft_bound import SIZES, TINY

    from invariance import SearchConfig

    images, repeats, loop = (2, 1, 20) if tiny else (2, 3, 400)
    total = _ops.OpCount()
    for c, s in (TINY if tiny else SIZES).values():
        coarse = _search_work(1, c, s, SearchConfig(refine_steps=0, polish_levels=0), dev) * images
        default = _search_work(1, c, s, SearchConfig(), dev) * images
        total = total + coarse * (2 * repeats + 3) + default * (repeats + 1) + _loop_work(images, c, s, 72, loop, dev)
    return total


def work_train_bench(tiny: bool, dev) -> _ops.OpCount:
    """bench_train.py: per round, ``steps`` SGD steps of each of the five models alone and together
    (priced as twice the plain loop), ``repeats`` rounds plus a one-step warm-up."""
    import torch.nn.functional as F
    from bench_train import BATCH, REPEATS, STEPS, TINY

    from stn import ARCHS, build_model

    steps, batch, repeats = TINY if tiny else (STEPS["cuda" if dev.type == "cuda" else "cpu"], BATCH, REPEATS)
    x = torch.rand(batch, 1, 28, 28, device=dev)
    y = torch.arange(batch, device=dev) % 10
    one = _ops.OpCount()
    for a in ARCHS:
        m = build_model(a, family="rotation").to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(m=m, opt=opt):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        one = one + _ops.count(step)
    return one * (2 * (steps * repeats + 1))


def work_reproduction(tiny: bool, dev, r: _ops.Rates) -> tuple[_ops.OpCount, float]:
    """stn reproduce --budget: per column, counted, the evaluation (every model on every test image,
    ``repeats`` times, at the column's image size), and the time of the calibration and training:
    the budget's seconds (the calibration pays from them and the steps are sized to fill the rest),
    or less when its ``max_steps`` bound ends it sooner. An SGD step is priced as three forward
    passes (forward, backward, update)."""
    from stn import ARCHS, BUDGETS, DEFAULT_FAMILY, build_model, get_protocol

    b = BUDGETS["tiny" if tiny else "gpu"]
    train = 0.0
    total = _ops.OpCount()
    for t, seeds in b.seeds.items():
        size = get_protocol(t, b.sizes[t]).size
        x = torch.rand(b.batch_size, 1, size, size, device=dev)
        step = _ops.OpCount()
        for a in ARCHS:
            m = build_model(a, family=DEFAULT_FAMILY[t], image_size=[size] * 2).to(dev).eval()
            with torch.no_grad():
                fwd = _ops.count(lambda m=m, x=x: m(x))
            total = total + fwd * (math.ceil(b.test_limit / x.shape[0]) * b.repeats * len(seeds))
            step = step + fwd * (3 * len(seeds))
        steps = min(b.warmup, b.calibrate) + b.calibrate + b.max_steps[t]
        train += min(float(b.seconds[t]), steps * _ops.seconds(step, r))
    return total, train


RESNET50_TIMED = {True: (1, 2), False: (2, 6)}
"""Images of the two timed calls that size the resnet50 part (tiny run, GPU run): far enough apart
that the per-image time is the batch's own, not the launches' of a one-image call."""


def _resnet50_call(images: int, tiny: bool, dev):
    """The resnet50 part's measure call on ``images`` images, ready to run (the benchmark's work)."""
    import torchvision
    from bench_resnet50 import smooth_images

    from invariance import SearchConfig, measure

    size, layer, angles = (64, "layer1", 72) if tiny else (224, "layer2", 360)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(dev)
    x = smooth_images(images, size).to(dev)
    return lambda: measure(model, x, "rotation:30", layers=layer, channels=("spatial",), n_boot=100,
                           config=SearchConfig(n_angles=angles), progress=False, floor_cache=False)


def time_resnet50(tiny: bool, dev) -> tuple[float, float] | None:
    """The fixed and the per-image seconds of the resnet50 part, **timed** on the device (``None``
    without torchvision): its measure call on ``n1`` and ``n2`` images (:data:`RESNET50_TIMED`)
    after a one-image warm-up; per image ``(t2 - t1) / (n2 - n1)``, fixed ``t1 - n1 * per image``
    (at least 0); both doubled for the bare-FFT pass the benchmark times afterwards (priced as the
    search again: it errs long). Timed, not counted: on the second GPU lease the counted operators
    priced as launches put 5.5 s on an image that took 0.66 s (many operators are views or host-side
    scalars, and a GPU overlaps launches with its work), and counting under the dispatcher is the
    plan's slowest step."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None
    n1, n2 = RESNET50_TIMED[tiny]
    if not tiny:
        _resnet50_call(1, tiny, dev)()  # warm-up: kernels, cuFFT plans, the allocator
    t1 = _ops.elapsed(_resnet50_call(n1, tiny, dev), dev)
    t2 = _ops.elapsed(_resnet50_call(n2, tiny, dev), dev)
    per_image = max(t2 - t1, 0.0) / (n2 - n1)
    return 2 * max(t1 - n1 * per_image, 0.0), 2 * per_image


def size_resnet50(cap: float, start: float, fixed: float, per_image: float, target: int) -> tuple[int, float]:
    """The most images (1 to ``target``) whose estimate stays within :data:`RESNET50_FILL` of the
    part's cap, and that estimate: ``PROCESSES * start + fixed + images * per_image``.

    >>> size_resnet50(100, 5.5, 2.0, 1.0, 1000)    # 70 s - 11 s of starts - 2 s fixed: 57 images
    (57, 70.0)
    >>> size_resnet50(100, 5.5, 2.0, 0.001, 1000)  # the target caps it
    (1000, 14.0)
    """
    base = PROCESSES["resnet50"] * start + fixed
    images = max(1, min(target, int((RESNET50_FILL * cap - base) / max(per_image, 1e-12))))
    return images, base + images * per_image


# ----------------------------------------------------------------------------- the plan

PROCESSES = {"search-bench": 2, "fft-bound": 1, "train-bench": 1, "reproduction": 1, "resnet50": 2}
"""The Python processes each part starts (the resnet50 benchmark runs each layer in a child)."""


def start_seconds() -> float:
    """Seconds a fresh interpreter takes to import torch and this project (each part pays it)."""
    import subprocess

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, invariance, stn"], check=True, cwd=ROOT)
    return time.perf_counter() - t0



def plan(tiny: bool, device: str, cap: dict[str, int], progress=print, parts_run=None,
         checkpoint=None) -> dict:
    """The plan (see the module docstring) as a dict: prices, per part its counts, estimate and cap.

    ``parts_run``: the parts the suite will run (default all); the others are not counted (counting
    under the dispatcher is slow on a GPU: 20 s for the search benchmark alone on an H200). The
    resnet50 part, the one the plan sizes, is counted first, and ``checkpoint(plan_so_far)`` is
    called after each part, so a plan stopped by its cap has still sized it."""
    dev = torch.device(device)
    wanted = {p.name for p in PARTS} if parts_run is None else set(parts_run)
    t0 = time.perf_counter()
    r = _ops.rates(dev)
    start = start_seconds()
    progress(f"prices on {dev}: {r.launch * 1e6:.1f} us per launch, {r.sync * 1e6:.1f} us per sync, "
             f"FFT {r.fft / 1e9:.1f} GFLOP/s, matmul {r.mm / 1e9:.1f} GFLOP/s, {r.bandwidth / 1e9:.1f} GB/s, "
             f"{start:.1f} s to start a process")
    parts = {p.name: ({"estimate": None, "counts": None, "cap": cap[p.name]} if p.name in wanted | {"plan"}
                      else {"estimate": 0.0, "counts": None, "cap": cap[p.name], "skipped": "not run (--parts)"})
             for p in PARTS}

    def summary(complete: bool) -> dict:
        parts["plan"]["measured"] = time.perf_counter() - t0
        est = sum(min(v["estimate"] if v["estimate"] is not None else v["cap"], v["cap"]) for v in parts.values())
        total = sum((v["estimate"] or 0.0) for v in parts.values()) + parts["plan"]["measured"]
        return {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                "tiny": tiny, "lease_seconds": LEASE_SECONDS, "prices": {**asdict(r), "process_start": start},
                "parts": parts, "complete": complete,
                "estimated_total": total, "bounded_total": est, "caps_total": sum(cap.values())}

    def done(text: str) -> None:
        progress(text)
        if checkpoint is not None:
            checkpoint(summary(complete=False))

    if "resnet50" in wanted:
        res = time_resnet50(tiny, dev)
        if res is None:
            parts["resnet50"].update(estimate=0.0, images=0, skipped="torchvision does not import")
        else:
            t_fixed, t_img = res
            target = 2 if tiny else RESNET50_IMAGES
            images, estimate = size_resnet50(cap["resnet50"], start, t_fixed, t_img, target)
            parts["resnet50"].update(estimate=estimate, images=images, target_images=target, fixed_seconds=t_fixed,
                                     seconds_per_image=t_img, timed_images=list(RESNET50_TIMED[tiny]))
        done(f"resnet50: {parts['resnet50'].get('images', 0)} of {RESNET50_IMAGES if not tiny else 2} "
             f"images, {parts['resnet50']['estimate']:.1f} s")
    if "reproduction" in wanted:
        c, train = work_reproduction(tiny, dev, r)
        parts["reproduction"].update(estimate=start + train + _ops.seconds(c, r), counts=asdict(c),
                                     training_seconds=train)
        done(f"reproduction: {parts['reproduction']['estimate']:.1f} s ({train:.0f} s of training)")
    for name, fn in (("train-bench", work_train_bench), ("search-bench", work_search_bench),
                     ("fft-bound", work_fft_bound)):
        if name in wanted:
            c = fn(tiny, dev)
            parts[name].update(estimate=PROCESSES[name] * start + _ops.seconds(c, r), counts=asdict(c))
            done(f"{name}: {parts[name]['estimate']:.1f} s")
    return summary(complete=True)


def markdown(p: dict) -> str:
    lines = [f"# GPU suite plan ({p['device']}{', tiny' if p['tiny'] else ''})", "",
             "Each part's time estimated from its op counts at this device's measured prices, the resnet50 "
             "part's from two timed calls of its work (`benchmarks/suite_plan.py`); a part that is not "
             "estimated is bounded by its cap.", "",
             "| part | estimate | cap | operators | FFT GFLOP | dense GFLOP | GB written |",
             "|---|---|---|---|---|---|---|"]
    for name, v in p["parts"].items():
        c = v["counts"]
        est = v.get("measured") if name == "plan" else v["estimate"]
        est = "not estimated" if est is None else f"{est:.1f} s"
        if name == "resnet50" and "images" in v and "skipped" not in v:
            est += f" ({v['images']} of {v['target_images']} images)"
        if "skipped" in v:
            est = f"skipped: {v['skipped']}"
        cols = ["", "", "", ""] if c is None else [f"{c['ops']:.3g}", f"{c['fft_flops'] / 1e9:.3g}",
                                                   f"{c['dense_flops'] / 1e9:.3g}", f"{c['bytes'] / 1e9:.3g}"]
        if "timed_images" in v:
            cols = [f"timed: {v['fixed_seconds']:.2f} s + {v['seconds_per_image']:.3f} s per image", "", "", ""]
        lines.append(f"| {name} | {est} | {v['cap']} s | " + " | ".join(cols) + " |")
    fits = p["bounded_total"] <= p["lease_seconds"]
    verdict = ("a tiny run: the lease does not apply" if p["tiny"]
               else f"lease {p['lease_seconds']} s: **{'fits' if fits else 'does not fit'}**")
    if not p.get("complete", True):
        lines += ["", "**Incomplete**: the plan was stopped (by its cap) before it counted every part; the "
                  "parts it has not reached are not estimated."]
    lines += ["", f"Estimated total {p['estimated_total']:.0f} s (not-estimated parts at 0); with every part "
              f"bounded by its cap {p['bounded_total']:.0f} s; caps {p['caps_total']} s; {verdict}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny (CPU smoke run) sizes")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--cap", action="append", type=parse_cap, default=[], metavar="PART=SECONDS")
    ap.add_argument("--caps", action="store_true", help="print 'PART SECONDS' per part and stop")
    ap.add_argument("--json", help="also write the plan here (and its markdown beside it)")
    ap.add_argument("--parts", help="only count these parts (comma-separated; default all)")
    args = ap.parse_args()
    cap = caps(args.tiny, dict(args.cap))
    if args.caps:
        print("\n".join(f"{k} {v}" for k, v in cap.items()))
        return
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    parts_run = None
    if args.parts:
        parts_run = [x for x in args.parts.split(",") if x]
        bad = sorted(set(parts_run) - set(cap))
        if bad:
            raise SystemExit(f"suite_plan: error: --parts: unknown part {bad[0]!r}; valid parts: {', '.join(cap)}")
    def write(p: dict) -> None:
        if args.json:
            from invariance.files import atomic_write_json, atomic_write_text

            atomic_write_json(Path(args.json), p)
            atomic_write_text(Path(args.json).with_suffix(".md"), markdown(p))

    p = plan(args.tiny, device, cap, progress=lambda s: print(s, file=sys.stderr, flush=True), parts_run=parts_run,
             checkpoint=write)
    write(p)
    print(markdown(p))
    if not args.tiny and p["bounded_total"] > LEASE_SECONDS:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
