"""Benchmark: the alignment search against the straightforward loop, side by side in one run.

    python benchmarks/bench_search.py [--quick] [--device cpu|cuda]

Two measurements, written to ``benchmarks/results/search.{json,md}`` with the machine:

1. **Speed and optimum** on a problem small enough for the loop to finish: a rotation x
   translation candidate set (``A`` angles x every integer shift). The baseline is what a
   researcher would write: a Python loop over candidates of ``affine_grid`` + ``grid_sample`` +
   masked squared error. Ours is :func:`invariance.align` (family ``rigid``) with the same angle
   grid and refinement switched off, so both search exactly the same candidate set; we report
   the throughput of each (candidates x images per second), their ratio, and whether our
   optimum is the same or better (its error, re-computed exactly, is <= the loop's minimum
   plus a float tolerance, for every image).
2. **Peak memory** of the full-size search: a 64-image batch of 256 x 28 x 28 feature maps, 360
   angles x all integer shifts, run in a fresh subprocess and measured as its peak resident set
   size (``ru_maxrss``) minus the baseline of the same process before the search. The loop's
   throughput on a sample of the same candidates is measured in the same run for the ratio at
   full size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import cpu_share, cpu_times, machine  # noqa: E402  (benchmarks/, the script's own folder)

from invariance import (  # noqa: E402
    SearchConfig,
    align,
    disk_mask,  # noqa: E402
    region_error,
)
from invariance import geometry as G  # noqa: E402
from invariance.files import atomic_write_json, atomic_write_text  # noqa: E402


def smooth_maps(b, c, h, w, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    x = F.avg_pool2d(x, 5, 1, 2)
    return (x - x.mean((2, 3), keepdim=True)).to(device) * disk_mask((h, w), 0.8).to(device)


def candidate_matrices(n_angles, h, w, dtype, device):
    """Centred-frame candidates: every angle x every integer shift, as in the search."""
    ang = G.angle_grid(n_angles, dtype=dtype, device=device)
    ty, tx = torch.meshgrid(torch.arange(-(h - 1), h, dtype=dtype, device=device),
                            torch.arange(-(w - 1), w, dtype=dtype, device=device), indexing="ij")
    a = ang[:, None].expand(-1, tx.numel()).reshape(-1)
    t = torch.stack([tx.flatten(), ty.flatten()], -1).repeat(n_angles, 1)
    return G.to_matrix("rigid", torch.cat([a[:, None], t], -1))


def loop_search(reference, moving, mats_centred, mask, limit=None):
    """The straightforward baseline: one affine_grid + grid_sample + masked error per candidate, over
    the comparison region of docs/definitions.md (the mask times the valid share of each position's
    bilinear footprint, a grid_sample of ones, with the warped values renormalised by that share),
    as the search computes it."""
    h, w = reference.shape[-2:]
    best = torch.full((reference.shape[0],), float("inf"), dtype=torch.float64)
    n = mats_centred.shape[0] if limit is None else min(limit, mats_centred.shape[0])
    norm = G.centred_to_normalized(mats_centred[:n], (h, w))
    theta = torch.linalg.inv(norm)[:, :2, :]
    b, c = reference.shape[:2]
    for k in range(n):
        grid = F.affine_grid(theta[k : k + 1].expand(b, 2, 3), [b, c, h, w], align_corners=False)
        warped = F.grid_sample(moving, grid, align_corners=False)
        share = F.grid_sample(torch.ones_like(moving[:, :1]), grid, align_corners=False)
        share = torch.where(share > 1e-6, share, torch.zeros_like(share))
        vals = warped / share.clamp_min(1e-6)
        r = mask * share
        den = (reference**2 * r).sum((1, 2, 3))
        overlap = r.sum((1, 2, 3)) >= 0.5 * mask.sum() - 1e-3  # the search's minimum overlap (no expected warp)
        err = torch.where(overlap & (den > 0), ((vals - reference) ** 2 * r).sum((1, 2, 3)) / den, torch.inf)
        best = torch.minimum(best, err.double().cpu())
    return best, n


def slice_loop_search(reference, moving, n_angles, mask, angles=None, shifts=None):
    """The best simple loop a researcher would write: rotate the moving maps **once per angle** (onto
    a canvas padded by ``h - 1`` / ``w - 1``, so every integer shift's window lies inside it), then
    slice the window of every shift and score it, one shift at a time. The same candidates, region
    and minimum overlap as :func:`loop_search` (an integer shift of a rotated map samples exactly
    where the shifted candidate does), at ``1 + 1/shifts`` warps per candidate instead of one.
    ``angles``, ``shifts``: only the first that many angles, and shifts per angle (for extrapolation;
    the candidates come in :func:`candidate_matrices`' order). Returns ``(best, candidates)``."""
    from invariance import warp

    h, w = reference.shape[-2:]
    ph, pw = h - 1, w - 1
    big = F.pad(moving, (pw, pw, ph, ph))
    ones = F.pad(torch.ones_like(moving[:, :1]), (pw, pw, ph, ph))
    best = torch.full((reference.shape[0],), float("inf"), dtype=torch.float64)
    need = 0.5 * mask.sum() - 1e-3
    ang = G.angle_grid(n_angles, dtype=torch.float32)[:angles]
    n = 0
    for a in ang:
        rot = G.to_matrix("rigid", torch.stack([a, a.new_zeros(()), a.new_zeros(())]))
        norm = G.centred_to_normalized(rot, big.shape[-2:]).to(big.device)
        canvas, share_c = warp(big, norm), warp(ones, norm)
        share_c = torch.where(share_c > 1e-6, share_c, torch.zeros_like(share_c))
        vals_c = canvas / share_c.clamp_min(1e-6)
        grid = [(ty, tx) for ty in range(-(h - 1), h) for tx in range(-(w - 1), w)]
        for ty, tx in grid[:shifts]:
            y0, x0 = ph - ty, pw - tx  # output(p) = canvas(p - t): the window starts at pad - t
            share = share_c[..., y0:y0 + h, x0:x0 + w]
            r = mask * share
            den = (reference**2 * r).sum((1, 2, 3))
            err = ((vals_c[..., y0:y0 + h, x0:x0 + w] - reference) ** 2 * r).sum((1, 2, 3)) / den
            ok = (r.sum((1, 2, 3)) >= need) & (den > 0)
            best = torch.minimum(best, torch.where(ok, err, torch.inf).double().cpu())
            n += 1
    return best, n


def bench_speed(args) -> dict:
    b, c, s, n_angles = (2, 4, 8, 2) if args.tiny else (8, 32, 16, 12) if args.quick else (16, 64, 20, 24)
    dev = args.device
    ref = smooth_maps(b, c, s, s, 0, dev)
    rot = G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([33.0, 1.7, -2.2])), (s, s)).to(dev)
    from invariance import warp

    mov = warp(ref, rot)
    mask = disk_mask((s, s), device=dev).to(ref.dtype)
    mats = candidate_matrices(n_angles, s, s, torch.float32, dev)
    cfg = SearchConfig(n_angles=n_angles, refine_steps=0, top_k=1, subpixel_top=0)  # the loop's candidate set
    # warm up both
    loop_search(ref[:1], mov[:1], mats, mask, limit=4)
    align(ref[:1], mov[:1], "rigid", mask=mask, config=cfg)
    res = {"images": b, "channels": c, "size": s, "angles": n_angles, "candidates": int(mats.shape[0])}
    t_loop, t_ours = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loop_best, n = loop_search(ref, mov, mats, mask)
        t_loop.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = align(ref, mov, "rigid", mask=mask, config=cfg)
        t_ours.append(time.perf_counter() - t0)
    tl, to = sorted(t_loop)[len(t_loop) // 2], sorted(t_ours)[len(t_ours) // 2]
    # our optimum, re-scored exactly (align already scores exactly); same or better than the loop
    tol = 1e-5
    res.update({
        "loop_seconds": tl, "ours_seconds": to,
        "loop_throughput": n * b / tl, "ours_throughput": n * b / to,
        "speedup": tl / to,
        "loop_best_error": loop_best.tolist(), "ours_best_error": ours.errors.cpu().tolist(),
        "ours_same_or_better": bool((ours.errors.cpu() <= loop_best + tol).all()),
    })
    # with refinement (what measure() uses): better still
    ref_cfg = SearchConfig(n_angles=n_angles, top_k=3, refine_steps=40)
    t0 = time.perf_counter()
    refined = align(ref, mov, "rigid", mask=mask, config=ref_cfg)
    res["ours_refined_seconds"] = time.perf_counter() - t0
    res["ours_refined_error"] = refined.errors.cpu().tolist()
    inv = torch.linalg.inv(rot)
    res["true_transform_error"] = region_error(ref, mov, inv, mask=mask).cpu().tolist()
    return res


def _memory_child(args) -> None:
    """Run the full-size search in this (fresh) process and print JSON with its peak RSS."""
    b, c, s, n_angles = 64, 256, 28, 360
    if args.quick:
        b, c, n_angles = 16, 64, 90
    if args.tiny:
        b, c, s, n_angles = 2, 4, 12, 4
    dev = args.device
    ref = smooth_maps(b, c, s, s, 1, dev)
    from invariance import warp

    mov = warp(ref, G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([-71.0, 2.0, 3.0])), (s, s)).to(dev))
    mask = disk_mask((s, s), device=dev).to(ref.dtype)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = SearchConfig(n_angles=n_angles, refine_steps=0, top_k=1, subpixel_top=0)  # the loop's candidate set
    t0, cpu0 = time.perf_counter(), cpu_times()
    out = align(ref, mov, "rigid", mask=mask, config=cfg)
    if dev == "cuda":
        torch.cuda.synchronize()
    secs, cpu = time.perf_counter() - t0, cpu_share(cpu0, cpu_times())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    data_bytes = 2 * ref.numel() * ref.element_size()
    n_cand = n_angles * (2 * s - 1) ** 2
    # loop throughput on a sample of the same candidate set
    mats = candidate_matrices(n_angles, s, s, torch.float32, dev)
    sample = mats[torch.randperm(mats.shape[0], generator=torch.Generator().manual_seed(0))[:24]]
    t1 = time.perf_counter()
    _, n = loop_search(ref, mov, sample, mask)
    loop_secs = (time.perf_counter() - t1) / n
    print(json.dumps({
        "images": b, "channels": c, "size": s, "angles": n_angles, "candidates": n_cand,
        "seconds": secs, "throughput": n_cand * b / secs, "cpu": cpu,
        "loop_seconds_per_candidate": loop_secs, "loop_throughput": b / loop_secs,
        "speedup": (loop_secs * n_cand) / secs,
        "peak_rss_bytes": peak, "baseline_rss_bytes": base, "search_peak_extra_bytes": peak - base,
        "inputs_bytes": data_bytes,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
        "mean_error": float(out.errors.mean()),
    }))


def bench_memory(args) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", "--device", args.device] + (["--quick"] if args.quick else []) \
        + (["--tiny"] if args.tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a smoke run of every part (CI; its numbers mean nothing)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.tiny:
        args.repeats = 1
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_child:
        _memory_child(args)
        return
    out = Path(args.out)
    tag = "" if args.device == "cpu" else f"_{args.device}"
    tag += "_quick" if args.quick else ""
    tag += "_tiny" if args.tiny else ""
    speed = bench_speed(args)
    # the first part on disk at once: a run stopped by a time cap (benchmarks/gpu_suite.sh) leaves it
    atomic_write_json(out / f"search{tag}.json", {"machine": machine(), "device": args.device, "quick": args.quick,
                                                  "speed": speed, "complete": False})
    print(f"speed: loop {speed['loop_throughput']:.0f} vs ours {speed['ours_throughput']:.0f} candidate-images/s "
          f"-> {speed['speedup']:.1f}x; same or better optimum: {speed['ours_same_or_better']}")
    mem = bench_memory(args)
    print(f"full size: {mem['candidates']} candidates x {mem['images']} images in {mem['seconds']:.1f} s "
          f"({mem['speedup']:.0f}x the loop), peak extra memory {mem['search_peak_extra_bytes'] / 2**30:.2f} GiB")
    result = {"machine": machine(), "device": args.device, "quick": args.quick, "speed": speed, "memory": mem,
              "complete": True,
              "targets": {"speedup_at_least": 50, "peak_memory_below_bytes": 2 * 2**30}}
    result["verdict"] = {
        "speedup_small": speed["speedup"] >= 50,
        "speedup_full": mem["speedup"] >= 50,
        "same_or_better_optimum": speed["ours_same_or_better"],
        "memory_below_2GB": mem["peak_rss_bytes"] < 2 * 2**30,
    }
    atomic_write_json(out / f"search{tag}.json", result)
    m = result["machine"]
    md = [
        f"# Alignment search benchmark ({args.device}{', quick' if args.quick else ''})", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"{m['platform']}; GPU: {m['gpu'] or 'none'}.", "",
        "Command: `python benchmarks/bench_search.py" + (" --quick" if args.quick else "")
        + (" --tiny" if args.tiny else "") + f" --device {args.device}`", "",
        "| measurement | loop (affine_grid + grid_sample + MSE) | ours (`align`, rigid) | ratio |",
        "|---|---|---|---|",
        f"| {speed['angles']} angles x all shifts ({speed['candidates']} candidates), {speed['images']} x "
        f"{speed['channels']}x{speed['size']}x{speed['size']} | {speed['loop_throughput']:.0f} cand.img/s | "
        f"{speed['ours_throughput']:.0f} cand.img/s | **{speed['speedup']:.0f}x** |",
        f"| {mem['angles']} angles x all shifts ({mem['candidates']} candidates), {mem['images']} x "
        f"{mem['channels']}x{mem['size']}x{mem['size']} | {mem['loop_throughput']:.0f} cand.img/s (sampled) | "
        f"{mem['throughput']:.0f} cand.img/s | **{mem['speedup']:.0f}x** |",
        "",
        f"- Same or better optimum than the loop on every image: **{speed['ours_same_or_better']}** "
        f"(max loop min-error {max(speed['loop_best_error']):.4f}, ours {max(speed['ours_best_error']):.4f}; "
        f"with refinement {max(speed['ours_refined_error']):.4f}; the true transform scores "
        f"{max(speed['true_transform_error']):.4f}).",
        f"- Peak resident memory of the full-size search process: **{mem['peak_rss_bytes'] / 2**30:.2f} GiB** "
        f"(of which {mem['search_peak_extra_bytes'] / 2**30:.2f} GiB above the process before the search; "
        f"inputs {mem['inputs_bytes'] / 2**20:.0f} MiB); target < 2 GiB: "
        f"**{result['verdict']['memory_below_2GB']}**.",
        f"- Full-size search time: {mem['seconds']:.1f} s; system time {mem['cpu']['system_share']:.1%} of its CPU "
        f"time ({mem['cpu']['system_s']:.2f} s of {mem['cpu']['user_s'] + mem['cpu']['system_s']:.2f} s, "
        f"{mem['cpu']['minor_faults']} page faults; target <= 5%).",
        "",
    ]
    atomic_write_text(out / f"search{tag}.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
