"""The scale column's check on the second lease (run as gpu_diag_tmp.py from the repository root, with
stn's private module paths for the same names): why STN-C0/-DL1 did not learn the scale column on CUDA."""
import json
import sys
import time

import torch

import invariance  # noqa
from stn import DEFAULT_FAMILY, StepSchedule, build_model, get_protocol, load_transformed, train_together

dev = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 200
p = get_protocol("scale", None)
ds = load_transformed("mnist", "train", p, seed=0, device=dev)
test = load_transformed("mnist", "test", p, seed=0, limit=512, device=dev)
out = {}
for mult, amp in ((1.0, True), (0.1, True), (1.0, False)):
    torch.manual_seed(0)
    ms = {f"{a}": build_model(a, family=DEFAULT_FAMILY["scale"], image_size=[p.size] * 2, n_classes=10).to(dev)
          for a in ("STN-C0", "STN-DL1")}
    t = time.time()
    h = train_together({0: (ds, ms)}, StepSchedule(steps=steps, lr=0.02), batch_size=256, loc_lr_mult=mult,
                       probe=test, probe_size=256, log_every=max(1, steps // 10), amp=amp, progress=False, log=print)
    with torch.no_grad():
        x, y = next(test.batches(0, 256))[:2]
        for n, m in ms.items():
            m.eval()
            _, tr = m.forward_with_transforms(x)
            A = tr.composed.float()
            print(f"mult {mult} amp {amp} {n}: det {torch.linalg.det(A[:, :2, :2]).abs().mean():.3f} "
                  f"|t| {A[:, :2, 2].abs().mean():.3f} acc {(m(x).argmax(1) == y).float().mean():.3f} "
                  f"({time.time()-t:.0f}s)")
    for n, hh in h.items():
        print(mult, amp, n, [(e["step"], round(e["train_loss"], 3), round(e["pose_spread"], 3)) for e in hh])
    out[f"{mult}-{amp}"] = h
json.dump(out, open(sys.argv[1], "w"))
