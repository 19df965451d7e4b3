"""Training throughput of the stn models against plain, straightforward implementations of the same networks.

One command::

    python benchmarks/bench_stn.py            # [--repeats 7] [--steps 3] [--batch 256] [--out benchmarks/results]

For STN-SL1 and STN-C1 (MNIST classifier, rotation family, 28x28 inputs, batch 256, SGD with
momentum) it measures training steps per second of

* ``stn``: :func:`stn.build_model` (configuration-built, geometry core, generic transformer);
* ``plain``: the same network written out by hand below (explicit layers, the rotation's
  sampling matrix built directly, ``affine_grid`` + ``grid_sample``),

after checking that both compute the same logits from the same weights. The two are measured
interleaved (alternating order, ``--repeats`` rounds of ``--steps`` steps each after a warm-up)
and the medians are compared: the ratio ``stn / plain`` should be at least 0.95. The same is
done on CUDA when a GPU is available. Results go to ``stn_throughput.json`` and
``stn_throughput.md`` with a description of the machine (and its load: these machines are
shared, so absolute numbers vary; the interleaving keeps the ratio fair).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

from invariance.files import atomic_write_json, atomic_write_text  # noqa: E402
from stn import build_model  # noqa: E402


class PlainSTN(nn.Module):
    """STN-SL1 or STN-C1 with a rotation transformer, written out directly."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(1, 64, 9, padding=4)
        self.conv2 = nn.Conv2d(64, 64, 7, padding=3)
        self.fc = nn.Linear(64 * 7 * 7, 10)
        self.lconv1 = nn.Conv2d(64, 32, 5, padding=2)
        self.lconv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.lfc1 = nn.Linear(32 * 4 * 4, 32)
        self.lfc2 = nn.Linear(32, 1)

    def angle(self, h: torch.Tensor) -> torch.Tensor:
        a = F.relu(F.max_pool2d(self.lconv1(h), 2, ceil_mode=True))
        a = F.relu(F.max_pool2d(self.lconv2(a), 2, ceil_mode=True))
        return self.lfc2(F.relu(self.lfc1(a.flatten(1))))[:, 0]  # radians, counter-clockwise

    @staticmethod
    def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        c, s = torch.cos(angle), torch.sin(angle)
        z = torch.zeros_like(c)
        theta = torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1)  # output -> input
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.max_pool2d(self.conv1(x), 2))
        if self.kind == "SL1":
            x = self.rotate(x, self.angle(h))
            h = F.relu(F.max_pool2d(self.conv1(x), 2))
        else:
            h = self.rotate(h, self.angle(h))
        h = F.relu(F.max_pool2d(self.conv2(h), 2))
        return self.fc(h.flatten(1))


def copy_weights(ours: nn.Module, plain: PlainSTN) -> None:
    t = ours.transformers[0]
    pairs = [(plain.conv1, ours.layers[0][0]), (plain.conv2, ours.layers[1][0]), (plain.fc, ours.head[1]),
             (plain.lconv1, t.localisation.head.net[0]), (plain.lconv2, t.localisation.head.net[3]),
             (plain.lfc1, t.localisation.head.net[7]), (plain.lfc2, t.regressor)]
    with torch.no_grad():
        for p, o in pairs:
            p.weight.copy_(o.weight)
            p.bias.copy_(o.bias)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(model: nn.Module, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_device(device: torch.device, repeats: int, steps: int, batch: int) -> list[dict]:
    rows = []
    for arch, kind in (("STN-SL1", "SL1"), ("STN-C1", "C1")):
        torch.manual_seed(0)
        ours = build_model(arch, family="rotation").to(device)
        with torch.no_grad():
            ours.transformers[0].regressor.weight.normal_(0, 0.05)  # a non-trivial rotation to check against
        plain = PlainSTN(kind).to(device)
        copy_weights(ours, plain)
        x = torch.rand(batch, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        with torch.no_grad():
            diff = (ours(x) - plain(x)).abs().max().item()
        if not diff < 1e-3:
            raise AssertionError(f"{arch}: stn and plain implementations disagree (max |diff| {diff:.3g})")
        fns = {"stn": _step_fn(ours, x, y), "plain": _step_fn(plain, x, y)}
        for fn in fns.values():  # warm-up
            for _ in range(2):
                fn()
        _sync(device)
        rates: dict[str, list[float]] = {"stn": [], "plain": []}
        for r in range(repeats):
            order = ("stn", "plain") if r % 2 == 0 else ("plain", "stn")
            for name in order:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    fns[name]()
                _sync(device)
                rates[name].append(steps * batch / (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in rates.items()}
        rows.append({"arch": arch, "device": str(device), "batch": batch, "steps_per_round": steps,
                     "rounds": repeats, "max_logit_diff": diff,
                     "stn_images_per_s": med["stn"], "plain_images_per_s": med["plain"],
                     "ratio": med["stn"] / med["plain"], "stn_rounds": rates["stn"], "plain_rounds": rates["plain"]})
        print(f"{device} {arch}: stn {med['stn']:.0f} img/s, plain {med['plain']:.0f} img/s, "
              f"ratio {med['stn'] / med['plain']:.3f}", flush=True)
    return rows


def machine() -> dict:
    cpu = cpu_model(platform.processor() or "")
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    m0 = machine()
    rows = bench_device(torch.device("cpu"), args.repeats, args.steps, args.batch)
    if torch.cuda.is_available():
        rows += bench_device(torch.device("cuda"), args.repeats * 3, args.steps * 5, args.batch)
    m1 = machine()
    res = {"benchmark": "stn training throughput vs plain implementation", "machine": m0,
           "load_average_after": m1["load_average"], "cuda_available": torch.cuda.is_available(),
           "target_ratio": 0.95, "results": rows,
           "all_ratios_meet_target": all(r["ratio"] >= 0.95 for r in rows)}
    out = Path(args.out)
    atomic_write_json(out / "stn_throughput.json", res)
    lines = ["# stn training throughput", "",
             "`python benchmarks/bench_stn.py`: training steps (forward, backward, SGD with momentum) of the "
             "configuration-built `stn` models against a plain hand-written implementation of the same network "
             "(checked to give the same logits), rotation family, 28x28 inputs, batch "
             f"{args.batch}; interleaved rounds (alternating order) of {args.steps} steps after a warm-up; medians "
             f"over {args.repeats} rounds on the CPU.", "",
             f"Machine: {m0['cpu']}, {m0['cpus']} CPUs, {m0['torch_threads']} torch threads, torch {m0['torch']}, "
             f"{m0['platform']}; OMP_WAIT_POLICY={m0['omp_wait_policy']}; GPU: {m0['gpu'] or 'none available'}. "
             f"Load average before / after: {', '.join(f'{v:.2f}' for v in m0['load_average'] or [])} / "
             f"{', '.join(f'{v:.2f}' for v in m1['load_average'] or [])} (a shared machine: other jobs ran "
             "alongside, so absolute rates vary; the ratio is measured interleaved).", "",
             "| device | architecture | stn (img/s) | plain (img/s) | ratio stn / plain | target |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['arch']} | {r['stn_images_per_s']:.0f} | {r['plain_images_per_s']:.0f} | "
                     f"{r['ratio']:.3f} | {'>= 0.95 met' if r['ratio'] >= 0.95 else 'NOT met'} |")
    if not torch.cuda.is_available():
        lines += ["", "No GPU was available for this run: the CUDA rows are missing (the script adds them when "
                  "`torch.cuda.is_available()`)."]
    atomic_write_text(out / "stn_throughput.md", "\n".join(lines) + "\n")
    print(f"wrote {out / 'stn_throughput.md'}")
    return 0 if all(math.isfinite(r["ratio"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
