"""Benchmark: training throughput of the budgeted path (all models of a column together) against the
plain per-model loop, side by side in one run.

    python benchmarks/bench_train.py [--device auto|cpu|cuda] [--steps N] [--batch 256] [--repeats 3] [--tiny]

For the five architectures of the paper's table (rotation protocol, 28 x 28, SGD with momentum):

* ``plain``: what :func:`stn.train` does, one model at a time: each model renders its own
  batches on the device and takes its steps in float32, contiguous memory;
* ``together``: :func:`stn.train_together`: the five models take their steps on one
  rendered batch per step, with bfloat16 autocast and channels-last memory on CUDA (both off on
  the CPU, where they are slower).

Rounds alternate the two (``--repeats`` rounds of ``--steps`` steps after a warm-up round) and
the medians are compared. Reported: images per second of each architecture in the plain loop,
model-images per second of all five (plain: five models' images over the sum of their times;
together: over the wall time) and their ratio. Written to
``train_throughput[_DEVICE][_tiny].{json,md}`` in ``--out`` (default ``benchmarks/results``) with
the machine and its load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

from invariance import load_digits  # noqa: E402
from invariance.files import atomic_write_json, atomic_write_text  # noqa: E402
from stn import (  # noqa: E402  # noqa: E402
    ARCHS,  # noqa: E402
    StepSchedule,
    TransformedDataset,
    batch_at_step,
    build_model,  # noqa: E402
    get_protocol,
    resolve_device,  # noqa: E402
    train_together,
)

STEPS = {"cpu": 20, "cuda": 50}
"""Steps per round by default (``--steps``): on CUDA 50 steps of the five models take about 2 s per
mode, timed between device synchronisations (200 made the part outrun its 20 s cap on the first
GPU run: 3 rounds x 2 modes x 200 steps)."""
BATCH, REPEATS = 256, 3
TINY = (1, 8, 1)
"""``--tiny``: steps, batch, repeats."""


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def plain(models: dict, ds: TransformedDataset, steps: int, batch: int, dev) -> dict[str, float]:
    """Seconds per architecture of ``steps`` SGD steps, one model at a time (as stn.train)."""
    out = {}
    for name, m in models.items():
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        _sync(dev)
        t = time.perf_counter()
        for s in range(steps):
            x, y = batch_at_step(ds, s, batch)
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(dev)
        out[name] = time.perf_counter() - t
    return out


def together(models: dict, ds: TransformedDataset, steps: int, batch: int, dev) -> float:
    """Wall seconds of ``steps`` steps of all models together (stn.train_together)."""
    _sync(dev)
    t = time.perf_counter()
    train_together({0: (ds, models)}, StepSchedule(steps=steps, lr=0.01), batch_size=batch, log_every=steps,
                   progress=False, log=None)
    _sync(dev)
    return time.perf_counter() - t


def _load(avg) -> str:
    return "n/a" if avg is None else "/".join(f"{v:.2f}" for v in avg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per round (default {STEPS['cpu']}; {STEPS['cuda']} on CUDA)")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--tiny", action="store_true", help="a smoke run (CI): 1 step of batch 8, 1 round")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    dev = resolve_device(a.device)
    steps = a.steps or STEPS[dev.type if dev.type in STEPS else "cuda"]
    batch, repeats = a.batch, a.repeats
    if a.tiny:
        steps, batch, repeats = TINY
    for name, v in (("steps", steps), ("batch", batch), ("repeats", repeats)):
        if v < 1:
            p.error(f"--{name}: must be a positive integer, got {v}")
    imgs, labels = load_digits()
    ds = TransformedDataset(imgs, labels, get_protocol("rotation"), seed=0, device=dev)
    torch.manual_seed(0)
    mk = {a_: build_model(a_, family="rotation").to(dev) for a_ in ARCHS}
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    plain(mk, ds, 1, batch, dev)  # warm-up
    together(mk, ds, 1, batch, dev)
    rounds_plain, rounds_together = [], []
    for r in range(repeats):
        if r % 2 == 0:
            rounds_plain.append(plain(mk, ds, steps, batch, dev))
            rounds_together.append(together(mk, ds, steps, batch, dev))
        else:
            rounds_together.append(together(mk, ds, steps, batch, dev))
            rounds_plain.append(plain(mk, ds, steps, batch, dev))
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None
    per_arch = {n: steps * batch / statistics.median(r[n] for r in rounds_plain) for n in ARCHS}
    plain_total = len(ARCHS) * steps * batch / statistics.median(sum(r.values()) for r in rounds_plain)
    together_total = len(ARCHS) * steps * batch / statistics.median(rounds_together)
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "load_average_before": load0, "load_average_after": load1},
        "device": str(dev), "tiny": a.tiny, "steps": steps, "batch": batch, "repeats": repeats,
        "amp_channels_last": dev.type == "cuda",
        "plain_images_per_s": per_arch, "plain_model_images_per_s": plain_total,
        "together_model_images_per_s": together_total, "ratio": together_total / plain_total,
    }
    tag = ("" if dev.type == "cpu" else f"_{dev.type}") + ("_tiny" if a.tiny else "")
    out = Path(a.out)
    atomic_write_json(out / f"train_throughput{tag}.json", result)
    m = result["machine"]
    md = [f"# Training throughput: the five architectures together against the per-model loop ({dev})", "",
          f"Command: `python benchmarks/bench_train.py --device {a.device}"
          + (" --tiny" if a.tiny else f" --steps {steps} --batch {batch} --repeats {repeats}")
          + f"`. Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads); GPU: "
          f"{m['gpu'] or 'none'}; load average {_load(load0)} before, {_load(load1)} after (nothing else running).",
          "",
          f"Rotation protocol, 28 x 28, batch {batch}, {steps} steps per round, median of {repeats} alternating "
          f"rounds. Together: one rendered batch per step for all five models"
          + (", bfloat16 autocast, channels-last." if dev.type == "cuda" else " (float32; no autocast on the CPU)."),
          "", "| architecture | plain loop (images/s) |", "|---|---|"]
    md += [f"| {n} | {v:.0f} |" for n, v in per_arch.items()]
    md += ["", "| all five | plain loop | together | ratio |", "|---|---|---|---|",
           f"| model-images/s | {plain_total:.0f} | {together_total:.0f} | **{result['ratio']:.2f}x** |", "",
           "On the CPU the models' own compute dominates, so sharing the rendered batch gains little; on a GPU "
           "the shared batch, bfloat16 and channels-last are what the budgeted reproduction relies on "
           "(`benchmarks/gpu_suite.sh` records the CUDA ratio).", ""]
    if a.tiny:
        md.insert(2, "A smoke run (`--tiny`): one step of 8 images; the numbers mean nothing.\n")
    atomic_write_text(out / f"train_throughput{tag}.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
