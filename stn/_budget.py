"""Step-budgeted training of several models at once on device-rendered batches, and the budgeted reproduction.

The per-run trainer (:func:`stn.train`) trains one model per process, epoch by epoch. On a GPU
the paper's STNs need many more SGD steps than a CPU allows (rotation compensation under
U[-90, 90] degrees takes off only after several thousand steps), and a model of this size uses
a fraction of the device. This module trains **all the models of one column** (the five
architectures, and every seed) in one loop:

* the transformed digits are rendered on the device, once per step and data seed, by the
  project's own warp (:meth:`stn.TransformedDataset.render`), and every model of that seed
  takes its SGD step on the same batch: no DataLoader, no host round trip;
* optionally in bfloat16 autocast and channels-last memory (``amp``, ``channels_last``; on by
  default on CUDA, off on the CPU, where they are slower);
* the learning rate follows a :class:`StepSchedule` expressed in steps whose first cut waits for
  the transformer's **take-off**: the canonical-pose spread of a fixed probe batch is measured
  every ``log_every`` steps, and a model has taken off once its spread falls below
  ``takeoff`` times the spread of the applied transformations alone (see
  :func:`stn.canonical_pose`); the take-off and the pose curve are logged;
* the whole state (models, optimisers, schedules, step, history) is checkpointed atomically
  every ``checkpoint_every`` steps, so an interrupted run resumes; the data of step ``s`` is a
  pure function of ``(seed, s)``.

:func:`reproduce_budget` runs the paper's three columns with it under a time budget and writes
the report after every column (a lease that ends early still leaves results). Budgets:
``gpu`` (about 4 minutes of training on one H100/H200, within the reproduction's 5-minute cap in
``benchmarks/gpu_suite.sh``) and ``tiny`` (a CPU smoke run of the
same code, seconds, used by ``benchmarks/gpu_suite.sh --tiny`` in CI).

>>> import torch, stn
>>> from stn import StepSchedule, TransformedDataset, get_protocol, train_together
>>> imgs, labels = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8), torch.arange(64) % 10
>>> ds = TransformedDataset(imgs, labels, get_protocol("rotation"), seed=0)
>>> models = {"CNN": stn.build_model("CNN", family="rotation")}
>>> hist = train_together({0: (ds, models)}, StepSchedule(steps=4, lr=0.01), batch_size=16,
...                       log_every=2, progress=False, log=None)
>>> [h["step"] for h in hist["CNN"]]
[2, 4]
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from invariance import save_checkpoint
from invariance.datasets import DatasetNotFoundError
from invariance.files import atomic_torch_save, atomic_write_json, atomic_write_text, safe_torch_load

from ._analysis import canonical_pose
from ._data import TransformedDataset, get_protocol, load_transformed
from ._models import STNClassifier, build_model
from ._train import (
    BUILDER,
    DEFAULT_FAMILY,
    DivergedError,
    evaluate_model,
    machine_info,
    make_optimizer,
    resolve_device,
    train_step,
)

__all__ = ["StepSchedule", "Budget", "BUDGETS", "train_together", "evaluate_repeats", "reproduce_budget"]


# ----------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class StepSchedule:
    """Learning rate per SGD step: ``lr`` until the first cut, times ``gamma`` after each cut.

    The first cut of a model comes ``hold`` (a fraction of ``steps``) after its transformer has
    taken off, but not before ``earliest`` and not after ``latest`` (fractions of ``steps``; a
    model without a transformer, or one that never takes off, is cut at ``earliest`` or
    ``latest`` respectively). The second cut is halfway from the first to the end.

    >>> s = StepSchedule(steps=1000, lr=0.1)
    >>> s.first_cut(None, has_transformer=True), s.first_cut(100, has_transformer=True)
    (850, 500)
    >>> s.first_cut(None, has_transformer=False)
    500
    """

    steps: int
    lr: float
    gamma: float = 0.1
    earliest: float = 0.5
    latest: float = 0.85
    hold: float = 0.25
    takeoff: float = 0.5

    def __post_init__(self):
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps: must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr!r}")
        if not 0 <= self.earliest <= self.latest <= 1:
            raise ValueError(f"earliest, latest: need 0 <= earliest <= latest <= 1, got {self.earliest}, {self.latest}")
        if not 0 < self.takeoff < 1:
            raise ValueError(f"takeoff: must be in (0, 1), got {self.takeoff!r}")

    def first_cut(self, takeoff_step: int | None, *, has_transformer: bool) -> int:
        """The step of the first cut, given the measured take-off step (None: not yet)."""
        lo, hi = int(self.earliest * self.steps), int(self.latest * self.steps)
        if not has_transformer:
            return lo
        if takeoff_step is None:
            return hi
        return min(max(lo, takeoff_step + int(self.hold * self.steps)), hi)

    def factor(self, step: int, takeoff_step: int | None, *, has_transformer: bool) -> float:
        """The learning-rate factor at ``step`` (0-based) for a model whose take-off is known so far."""
        c1 = self.first_cut(takeoff_step, has_transformer=has_transformer)
        if takeoff_step is None and has_transformer and step < c1:
            return 1.0  # still waiting for the take-off
        c2 = c1 + (self.steps - c1) // 2
        return self.gamma ** ((step >= c1) + (step >= c2))


# ----------------------------------------------------------------------------- training


def batch_at_step(ds: TransformedDataset, step: int, batch_size: int):
    """The batch of SGD step ``step``: epoch ``step // steps_per_epoch``, a pure function of (seed, step)."""
    per_epoch = math.ceil(len(ds) / batch_size)
    epoch, k = divmod(step, per_epoch)
    d = ds.draws(epoch)
    index = d.order[k * batch_size:(k + 1) * batch_size]
    x, _ = ds.render(index, d)
    return x, ds.labels[index.to(ds.device)]


class _Probe:
    """A fixed batch of test images with their applied transformations: the canonical pose during training."""

    def __init__(self, ds: TransformedDataset, n: int):
        d = ds.draws(0)
        index = torch.arange(min(n, len(ds)))
        self.x, self.applied = ds.render(index, d)
        self.labels = ds.labels[index.to(ds.device)].cpu()
        self.applied = self.applied.double().cpu()
        self.protocol = ds.protocol

    @torch.no_grad()
    def spread(self, model: STNClassifier) -> tuple[float, float]:
        was = model.training
        model.eval()
        _, tr = model.forward_with_transforms(self.x)
        model.train(was)
        comp = tr.composed if tr.composed is not None else torch.eye(3).expand(len(self.x), 3, 3)
        cp = canonical_pose(self.protocol, self.labels, self.applied, comp.detach().double().cpu())
        return cp["mean_spread"], cp["applied_only_mean_spread"]


def train_together(groups: dict, schedule: StepSchedule, *, batch_size: int = 256, momentum: float = 0.9,
                   loc_lr_mult: float = 1.0, weight_decay: float = 0.0, probe: TransformedDataset | None = None,
                   probe_size: int = 512, log_every: int = 500, amp: bool | None = None,
                   channels_last: bool | None = None, checkpoint: str | os.PathLike | None = None,
                   checkpoint_every: int = 2000, time_limit: float | None = None, progress: bool = True,
                   log: Callable[[str], None] | None = print) -> dict[str, list[dict]]:
    """Train several models in lock-step for ``schedule.steps`` SGD steps.

    Args:
        groups: ``{data seed: (training data, {name: model})}``; the models of a group take their
            steps on the same rendered batches (one render per step and group). Names are unique.
        schedule: the :class:`StepSchedule` (each model keeps its own take-off and cuts).
        batch_size, momentum, loc_lr_mult, weight_decay: SGD settings (as :class:`stn.TrainConfig`).
        probe: test data whose first ``probe_size`` images measure the canonical pose every
            ``log_every`` steps (default: none; then no take-off is measured and transformers are
            cut at ``schedule.latest``).
        amp, channels_last: bfloat16 autocast and channels-last memory (default: on for CUDA).
        checkpoint: file of the training state (resumed from when it exists), written every
            ``checkpoint_every`` steps and at the end.
        time_limit: seconds after which training stops early (the history says at which step).
        progress: a tqdm bar over the steps; log: where the log lines go (None: nowhere).

    Returns ``{name: history}``; an entry per ``log_every`` steps (and the last): step, lr,
    mean training loss and error since the last entry, pose spread and its applied-only
    baseline, take-off step, seconds.
    """
    say = log or (lambda _m: None)
    flat = {name: (seed, m) for seed, (_, ms) in groups.items() for name, m in ms.items()}
    if len(flat) != sum(len(ms) for _, ms in groups.values()):
        raise ValueError("groups: model names must be unique across groups")
    if not flat:
        raise ValueError("groups: no models to train")
    dev = next(next(iter(flat.values()))[1].parameters()).device
    amp = dev.type == "cuda" if amp is None else amp
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for _, m in flat.values():
        m.to(memory_format=fmt).train()
    opts = {n: make_optimizer(m, schedule.lr, loc_lr_mult, momentum, weight_decay) for n, (_, m) in flat.items()}
    has_t = {n: bool(m.localisation_parameters()) for n, (_, m) in flat.items()}
    takeoff: dict[str, int | None] = {n: None for n in flat}
    history: dict[str, list[dict]] = {n: [] for n in flat}
    start, elapsed = 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        st = safe_torch_load(checkpoint, dev, what="checkpoint")
        if sorted(st["models"]) != sorted(flat) or st["schedule"] != asdict(schedule):
            raise ValueError(f"checkpoint: {checkpoint} holds another training (models or schedule differ)")
        for n, (_, m) in flat.items():
            m.load_state_dict(st["models"][n])
            opts[n].load_state_dict(st["optimizers"][n])
        start, elapsed, takeoff, history = st["step"], st["seconds"], st["takeoff"], st["history"]
        say(f"resuming at step {start}/{schedule.steps}")
    pr = _Probe(probe, probe_size) if probe is not None else None
    if pr is not None and channels_last:
        pr.x = pr.x.contiguous(memory_format=fmt)
    sums = {n: torch.zeros(2, device=dev) for n in flat}  # loss sum, wrong count since the last entry
    seen = 0
    autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext())

    def save(step):
        if checkpoint is not None:
            atomic_torch_save(checkpoint, {
                "step": step, "seconds": elapsed, "schedule": asdict(schedule), "takeoff": takeoff,
                "history": history, "models": {n: m.state_dict() for n, (_, m) in flat.items()},
                "optimizers": {n: o.state_dict() for n, o in opts.items()}})

    bar = tqdm(total=schedule.steps, initial=start, desc="steps", disable=None if progress else True,
               file=sys.stderr, smoothing=0.05)
    t0 = time.perf_counter()
    step = start
    while step < schedule.steps:
        for ds, models in groups.values():
            x, y = batch_at_step(ds, step, batch_size)
            x = x.contiguous(memory_format=fmt)
            for n, m in models.items():
                f = schedule.factor(step, takeoff[n], has_transformer=has_t[n])
                for g in opts[n].param_groups:
                    g["lr"] = g["base_lr"] * f
                loss, logits = train_step(m, opts[n], x, y, autocast=autocast)
                with torch.no_grad():
                    sums[n] += torch.stack([loss.detach() * len(y), (logits.argmax(1) != y).sum().to(loss.dtype)])
        seen += len(y)
        step += 1
        bar.update(1)
        now = elapsed + time.perf_counter() - t0
        out_of_time = time_limit is not None and now >= time_limit
        if step % log_every == 0 or step == schedule.steps or out_of_time:
            for n, (_, m) in flat.items():
                loss_sum, wrong = sums[n].tolist()
                if not math.isfinite(loss_sum):
                    bar.close()
                    raise DivergedError(f"training diverged: {n}'s loss is {loss_sum} before step {step} "
                                        f"(lr {opts[n].param_groups[0]['lr']:g}); lower the learning rate")
                entry = {"step": step, "lr": opts[n].param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
                         "train_error": wrong / max(seen, 1), "seconds": now}
                if pr is not None:
                    spread, base = pr.spread(m)
                    entry.update(pose_spread=spread, applied_spread=base)
                    if has_t[n] and takeoff[n] is None and spread <= schedule.takeoff * base:
                        takeoff[n] = step
                        say(f"{n}: took off at step {step} (pose spread {spread:.3g} <= "
                            f"{schedule.takeoff} x {base:.3g})")
                entry["takeoff"] = takeoff[n]
                history[n].append(entry)
                sums[n].zero_()
            seen = 0
            bar.set_postfix(loss=f"{min(h[-1]['train_loss'] for h in history.values()):.3f}")
        if checkpoint is not None and (step % checkpoint_every == 0 or step == schedule.steps or out_of_time):
            elapsed, t0 = now, time.perf_counter()
            save(step)
        if out_of_time:
            say(f"time limit of {time_limit:.0f} s reached at step {step}/{schedule.steps}")
            break
    bar.close()
    return history


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_repeats(model: STNClassifier, test: TransformedDataset, repeats: int, *, seed: int = 1000) -> dict:
    """Test error averaged over ``repeats`` fixed random transformations of every test image.

    Repeat ``r`` draws the transformations of the test images from seed ``seed + r`` (the same
    draws for every model, so that comparisons are paired). Returns the mean error, the error of
    each repeat, a standard error (binomial over all ``repeats x N`` predictions), the per-image
    correctness string (repeats concatenated) and the canonical pose over all repeats.
    """
    errors, correct, labels, applied, composed = [], [], [], [], []
    for r in range(repeats):
        ds = TransformedDataset(test.images, test.labels, test.protocol, seed=seed + r, split="test",
                                device=test.device)
        ev = evaluate_model(model, ds)
        errors.append(ev["error"])
        correct.append(ev["correct"])
        labels.append(ev["labels"])
        applied.append(ev["applied"])
        composed.append(ev["composed"])
    c = torch.cat(correct)
    err = 1.0 - c.double().mean().item()
    return {"test_error": err, "repeat_errors": errors, "n_predictions": len(c),
            "test_error_se": math.sqrt(max(err * (1 - err), 0.0) / len(c)),
            "correct": "".join("1" if v else "0" for v in c.tolist()),
            "canonical_pose": canonical_pose(test.protocol, torch.cat(labels), torch.cat(applied), torch.cat(composed))}


# ----------------------------------------------------------------------------- the budgeted reproduction


@dataclass(frozen=True)
class Budget:
    """Settings of a budgeted reproduction (all written into the report).

    ``seconds[t]`` is the time of column ``t``'s calibration and training (the steps are sized
    from the throughput measured in ``calibrate`` timed steps after ``warmup`` steps, to fill what
    the calibration left, at most ``max_steps[t]``).
    """

    name: str
    seconds: dict
    max_steps: dict
    seeds: dict
    sizes: dict
    batch_size: int = 256
    lr: float = 0.02
    loc_lr_mult: dict = field(default_factory=lambda: {"rotation": 1.0, "scale": 1.0, "translation": 0.03})
    train_limit: int | None = None
    test_limit: int = 2000
    repeats: int = 5
    probe_size: int = 512
    log_every: int = 500
    calibrate: int = 40
    warmup: int = 10
    data: str = "mnist"
    note: str = ""


BUDGETS: dict[str, Budget] = {
    "gpu": Budget(
        name="gpu", seconds={"rotation": 135, "scale": 65, "translation": 55},
        # the scale column's localisation at 0.1: on the full 112-px canvas a step of the warp's
        # parameters moves the image ~4x as many pixels as at 28 px; at 1.0 the second GPU lease's
        # STN-C0 and STN-DL1 stayed at chance level (benchmarks/results/gpu/README.md)
        loc_lr_mult={"rotation": 1.0, "scale": 0.1, "translation": 0.03},
        max_steps={"rotation": 60000, "scale": 30000, "translation": 30000},
        seeds={"rotation": (0, 1), "scale": (0,), "translation": (0,)},
        sizes={"rotation": None, "scale": None, "translation": None}, log_every=100,
        note="One H100/H200 within the GPU suite's 5-minute reproduction part: full protocols, the five "
             "architectures of a column (and both rotation seeds) trained together on device-rendered batches, "
             "bfloat16 autocast and channels-last; steps sized from the measured throughput; learning rate cut "
             "only after take-off."),
    "tiny": Budget(
        name="tiny", seconds={"rotation": 5, "scale": 5, "translation": 5},
        max_steps={"rotation": 4, "scale": 2, "translation": 2},
        seeds={"rotation": (0, 1), "scale": (0,), "translation": (0,)},
        sizes={"rotation": None, "scale": 28, "translation": 28},
        batch_size=8, train_limit=128, test_limit=40, repeats=2, probe_size=16, log_every=2, calibrate=1,
        note="A smoke run of the GPU path on a CPU (CI): every part runs, nothing is trained; its numbers "
             "mean nothing about the paper's claims."),
}


def _calibrate(budget: Budget, transform, archs, trains, family, protocol, loc, dev) -> tuple[int, float]:
    """Steps that fit the column's time: the throughput of a short run of fresh models (then discarded).

    The column's ``seconds`` pay for this calibration too (a warm-up of ``budget.warmup`` steps for
    the kernels and the allocator, then ``budget.calibrate`` timed steps): the training gets what is
    left, so a column takes its ``seconds`` and a budget's columns fit its time by construction (on
    the second GPU lease the calibration took 40 s beyond the 255 s of training, and the part's cap
    stopped the last column)."""
    seeds = budget.seeds[transform]
    t0 = time.perf_counter()
    cal = {f"cal/{a}": build_model(a, family=family, image_size=[protocol.size] * 2).to(dev) for a in archs}

    def run(steps):
        train_together({seeds[0]: (trains[seeds[0]], cal)}, StepSchedule(steps=steps, lr=budget.lr),
                       batch_size=budget.batch_size, loc_lr_mult=loc, log_every=steps, progress=False, log=None)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    run(min(budget.warmup, budget.calibrate))
    t = time.perf_counter()
    run(budget.calibrate)
    now = time.perf_counter()
    per_step = (now - t) / budget.calibrate * len(seeds)
    left = budget.seconds[transform] - (now - t0)
    return int(max(1, min(budget.max_steps[transform], left / max(per_step, 1e-9)))), per_step


def _fallback_reason(budget: Budget, data_root, exc: BaseException) -> str | None:
    """Why a column runs on the 500 shipped digits instead of the data set; ``None``: it must not (re-raise).

    Only the ``tiny`` budget falls back (a smoke run of the code, whose numbers mean nothing), only
    when no data set is found at all (a malformed data file is an error), and never when
    ``data_root`` was given: an explicit folder that lacks the data is an error, as everywhere
    (:func:`invariance.datasets.find_dataset_dir`).

    >>> _fallback_reason(BUDGETS["tiny"], None, DatasetNotFoundError("mnist test files not found; looked in: x", []))
    'mnist test files not found; looked in: x'
    >>> _fallback_reason(BUDGETS["gpu"], None, DatasetNotFoundError("mnist data not found", [])) is None
    True
    """
    if budget.name != "tiny" or data_root is not None or not isinstance(exc, DatasetNotFoundError):
        return None
    return (str(exc).strip().splitlines() or [f"no {budget.data} data set found"])[0]


def _column(budget: Budget, transform: str, archs, dev, data_root, out: Path, log) -> dict:
    """Train and evaluate one column; returns its cells and timings."""
    from invariance import load_digits

    size = budget.sizes[transform]
    protocol = get_protocol(transform, size)
    family = DEFAULT_FAMILY[transform]
    t0 = time.perf_counter()
    try:
        test = load_transformed(budget.data, "test", protocol, root=data_root, seed=0, limit=budget.test_limit,
                                device=dev)
        trains = {s: load_transformed(budget.data, "train", protocol, root=data_root, seed=s,
                                      limit=budget.train_limit, device=dev) for s in budget.seeds[transform]}
        source, fallback = trains[budget.seeds[transform][0]].description, None
    except DatasetNotFoundError as exc:
        fallback = _fallback_reason(budget, data_root, exc)
        if fallback is None:
            raise
        imgs, labels = load_digits()  # sorted by class: split them at random
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        te, tr = perm[:budget.test_limit], perm[budget.test_limit:]
        test = TransformedDataset(imgs[te], labels[te], protocol, split="test", device=dev,
                                  description="shipped digits")
        trains = {s: TransformedDataset(imgs[tr], labels[tr], protocol, seed=s, device=dev,
                                        description="shipped digits") for s in budget.seeds[transform]}
        source = f"the 500 shipped digits instead of {budget.data} ({fallback})"
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused column leaves no folder behind
    n_classes = 10
    groups = {}
    for s in budget.seeds[transform]:
        torch.manual_seed(s)
        groups[s] = (trains[s], {f"{a}/seed{s}": build_model(a, family=family, image_size=[protocol.size] * 2,
                                                            n_classes=n_classes).to(dev) for a in archs})
    loc = budget.loc_lr_mult[transform]
    state = out / f"{transform}.state.pt"
    tc = time.perf_counter()
    if state.exists():  # an interrupted column: resume with the steps it was sized for
        steps = safe_torch_load(state, "cpu", what="state")["schedule"]["steps"]
        per_step = float("nan")
        log(f"{transform}: resuming the interrupted column ({steps} steps)")
    else:
        steps, per_step = _calibrate(budget, transform, archs, trains, family, protocol, loc, dev)
        log(f"{transform}: {per_step * 1e3:.1f} ms per step for {len(archs) * len(groups)} models -> {steps} steps")
    schedule = StepSchedule(steps=steps, lr=budget.lr)
    t1 = time.perf_counter()
    hist = train_together(groups, schedule, batch_size=budget.batch_size, loc_lr_mult=loc, probe=test,
                          probe_size=budget.probe_size, log_every=max(1, min(budget.log_every, steps)),
                          checkpoint=state, time_limit=1.5 * budget.seconds[transform],
                          progress=True, log=log)
    t2 = time.perf_counter()
    cells = {}
    for s, (_, models) in groups.items():
        for name, m in models.items():
            arch = name.split("/")[0]
            ev = evaluate_repeats(m, test, budget.repeats)
            save_checkpoint(out / transform / f"{arch}-seed{s}.pt", m.to(memory_format=torch.contiguous_format),
                            builder=BUILDER, config=m.config)
            cells[name] = {"arch": arch, "seed": s, "history": hist[name],
                           "steps": hist[name][-1]["step"] if hist[name] else 0, **ev}
    t3 = time.perf_counter()
    return {"transform": transform, "protocol": protocol.describe(), "data": source, "fallback": fallback,
            "steps": steps, "ms_per_step": 1e3 * per_step, "cells": cells,
            "seconds": {"load": tc - t0, "calibrate": t1 - tc, "train": t2 - t1, "evaluate": t3 - t2}}


def _table(columns: dict) -> tuple[dict, dict]:
    """Seed-mean test error (%) per arch and column, and the per-image correctness (seeds concatenated)."""
    table, correct = {}, {}
    for t, col in columns.items():
        by_arch: dict[str, list] = {}
        for c in col["cells"].values():
            by_arch.setdefault(c["arch"], []).append(c)
        for a, cs in by_arch.items():
            cs = sorted(cs, key=lambda c: c["seed"])
            table.setdefault(a, {})[t] = 100 * sum(c["test_error"] for c in cs) / len(cs)
            correct[(a, t)] = "".join(c["correct"] for c in cs)
    return table, correct


def _figure(columns: dict, path: Path) -> None:
    """Canonical-pose spread (relative to the applied transformations') over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), squeeze=False)
    for ax, (t, col) in zip(axes[0], columns.items()):
        for name, c in col["cells"].items():
            h = [e for e in c["history"] if "pose_spread" in e]
            if h:
                ax.plot([e["step"] for e in h], [e["pose_spread"] / max(e["applied_spread"], 1e-12) for e in h],
                        label=name, lw=1.2)
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set(title=t, xlabel="SGD step", ylabel="pose spread / applied spread", ylim=(0, None))
        ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _markdown(r: dict) -> str:
    from ._reproduce import ARCHS, PAPER_TABLE, SHORT, comparison_line, verdict

    cols = list(r["columns"])
    lines = [f"# STN reproduction, budget `{r['budget']}`", "", r["note"], ""]
    if r.get("data_fallback"):
        lines += [f"**Data: the 500 digits shipped with the package, not {r['settings']['data']}**: "
                  f"{r['data_fallback']}", ""]
    lines += [f"Device: {r['device']} ({r['machine'].get('cuda') or r['machine']['platform']}); "
              f"{r['seconds']:.0f} s in all.", "",
              "Test error (%), mean over seeds and over "
              f"{r['settings']['repeats']} fixed random transformations of each test image; paper in brackets.", "",
              "| arch | " + " | ".join(f"{SHORT[t]} ({r['columns'][t]['steps']} steps)" for t in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for a in ARCHS:
        if a in r["table"]:
            cells = [f"{r['table'][a][t]:.2f} ({PAPER_TABLE[a][t]:.2f})" if t in r["table"][a] else "-" for t in cols]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims", ""]
    for c in r["claims"]:
        lines.append(f"- {verdict(c)} {c['claim']}")
        lines += [f"  - {comparison_line(x)}" for x in c.get("comparisons", [])]
    lines += ["", "## Canonical pose (mean per-class spread of the pose reached / of the applied transformation "
              "alone; smaller is more canonical)", "",
              "| model | " + " | ".join(SHORT[t] for t in cols) + " |", "|---|" + "---|" * len(cols)]
    names = sorted({n for t in cols for n in r["columns"][t]["cells"]})
    for n in names:
        row = []
        for t in cols:
            c = r["columns"][t]["cells"].get(n)
            if c is None:
                row.append("-")
                continue
            cp = c["canonical_pose"]
            take = next((e["takeoff"] for e in reversed(c["history"]) if e.get("takeoff") is not None), None)
            row.append(f"{cp['mean_spread']:.3g} / {cp['applied_only_mean_spread']:.3g}"
                       + (f" (take-off {take})" if take is not None else ""))
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    lines += ["", "![canonical pose during training](canonical_pose.png)", "", "## Time", "",
              "| column | steps | ms/step (all models) | load s | calibrate s | train s | evaluate s |",
              "|---|---|---|---|---|---|---|"]
    for t in cols:
        c, s = r["columns"][t], r["columns"][t]["seconds"]
        lines.append(f"| {t} | {c['steps']} | {c['ms_per_step']:.1f} | {s['load']:.1f} | {s['calibrate']:.1f} | "
                     f"{s['train']:.1f} | {s['evaluate']:.1f} |")
    lines += ["", "Data: " + "; ".join(f"{t}: {r['columns'][t]['data']}, {r['columns'][t]['protocol']}" for t in cols),
              ""]
    return "\n".join(lines)


def reproduce_budget(budget: str = "gpu", *, out: str | os.PathLike = "runs/budget",
                     results: str | os.PathLike = "benchmarks/results/gpu", device: str = "auto",
                     data_root: str | None = None, transforms=("rotation", "scale", "translation"),
                     log: Callable[[str], None] = print) -> dict:
    """The paper's three columns under a :data:`BUDGETS` entry; the report is rewritten after every column.

    Writes ``results/reproduction.{json,md}`` and ``results/canonical_pose.png``; the models go
    to ``out/<transform>/<arch>-seed<s>.pt`` (invariance checkpoints) and the training state to
    ``out/<transform>.state.pt`` (a rerun resumes an interrupted column).

    Data: the ``tiny`` budget runs on the 500 digits shipped with the package when no data set is
    found (and ``data_root`` is None; see ``_fallback_reason``): it says so in a warning on stderr,
    in the report's ``data_fallback`` (``None`` when the data set was used) and at the top of
    ``reproduction.md``. Every other budget, and any ``data_root`` that lacks the data, raises
    :class:`invariance.datasets.DatasetNotFoundError`.
    """
    from ._reproduce import ARCHS, TRANSFORMS, check_claims

    if budget not in BUDGETS:
        raise ValueError(f"budget: unknown budget {budget!r}; valid choices: {', '.join(BUDGETS)}")
    bad = [t for t in transforms if t not in TRANSFORMS]
    if bad or not transforms:
        raise ValueError(f"transforms: unknown protocol(s) {bad or '(none)'}; valid choices: {', '.join(TRANSFORMS)}")
    b = BUDGETS[budget]
    dev = resolve_device(device)
    out, results = Path(out), Path(results)
    t0 = time.perf_counter()
    columns: dict = {}
    report: dict = {}
    fallback = None
    for t in transforms:
        log(f"column {t}: training {len(ARCHS)} architectures x seeds {b.seeds[t]} together on {dev}")
        columns[t] = _column(b, t, ARCHS, dev, data_root, out, log)
        if columns[t]["fallback"] and fallback is None:
            fallback = columns[t]["fallback"]
            print(f"warning: the {b.name} budget runs on the 500 digits shipped with the package instead of "
                  f"{b.data} (a smoke run of the code; its numbers say nothing about the paper): {fallback}",
                  file=sys.stderr, flush=True)
        table, correct = _table(columns)
        done = [x for x in TRANSFORMS if x in columns]
        report = {"budget": b.name, "note": b.note, "device": str(dev), "machine": machine_info(),
                  "settings": {k: v for k, v in asdict(b).items() if k != "note"},
                  "seconds": time.perf_counter() - t0, "data_fallback": fallback, "table": table,
                  "claims": check_claims(table, correct, done),
                  "columns": {x: {k: (v if k != "cells" else {n: {kk: vv for kk, vv in c.items() if kk != "correct"}
                                                              for n, c in v.items()})
                                  for k, v in columns[x].items()} for x in done}}
        results.mkdir(parents=True, exist_ok=True)
        atomic_write_json(results / "reproduction.json", report)
        _figure(report["columns"], results / "canonical_pose.png")
        atomic_write_text(results / "reproduction.md", _markdown(report))
        log(f"column {t} done ({time.perf_counter() - t0:.0f} s in all); wrote {results / 'reproduction.md'}")
    return report
