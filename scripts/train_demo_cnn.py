"""Rebuild ``invariance/data/mnist_cnn.pt``: the paper's MNIST CNN trained by the ``stn`` code.

    python scripts/train_demo_cnn.py [--epochs 10] [--out invariance/data/mnist_cnn.pt]

Trains ``stn``'s ``CNN`` architecture (the paper's MNIST classifier) on the rotated-MNIST
protocol (uniform angles in [-90, 90] degrees) with ``stn.train``, on the 8,000-image training
part of the stratified split of the MNIST test set (needs ``INVARIANCE_DATA``), copies its
weights into :func:`invariance.mnist_cnn` (a plain ``nn.Sequential`` that the
``invariance`` package can rebuild without importing ``stn``), checks that both give the same
logits, and writes the checkpoint atomically (weights stored as float16 to keep the package
small; the test error is measured with the float16-rounded weights).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from invariance import mnist_cnn, save_checkpoint


def main() -> None:
    import stn
    from invariance.datasets import DataSplit  # noqa: F401  (fail early without data)
    from stn import TrainConfig, evaluate_model, load_run, train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--run", default="runs/demo-cnn", help="training folder (resumable)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "invariance" / "data" / "mnist_cnn.pt"))
    a = p.parse_args()
    cfg = TrainConfig(arch="CNN", dataset="mnist", transform="rotation", epochs=a.epochs, milestones=[12])
    run = Path(a.run)
    train(cfg, run, device="cpu", resume=(run / "metrics.json").exists())
    model, cfg, metrics = load_run(run, device="cpu")
    model.eval()
    plain = mnist_cnn().eval()
    src = [m for m in model.layers.modules() if isinstance(m, torch.nn.Conv2d)]
    src += [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    dst = [m for m in plain.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(src) == len(dst) == 3, (len(src), len(dst))
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(s.weight.half().float())
            d.bias.copy_(s.bias.half().float())
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        got = plain(x)
    assert torch.allclose(ref, got, atol=0.05), float((ref - got).abs().max())
    test = stn.load_transformed("mnist", "test", cfg.protocol)
    stn_error = evaluate_model(model, test)["error"]
    half = {k: v.half() for k, v in plain.state_dict().items()}
    plain.load_state_dict({k: v.float() for k, v in half.items()})
    correct = 0
    with torch.no_grad():
        for xb, yb, _ in test.batches(0, 500):
            correct += int((plain(xb).argmax(1) == yb).sum())
    err = 1 - correct / len(test)
    obj_model = mnist_cnn()
    obj_model.load_state_dict({k: v.float() for k, v in half.items()})
    save_checkpoint(a.out, obj_model, builder="invariance:mnist_cnn", config={},
                    trained_by="stn.train (arch CNN, rotation protocol, mnist-10k split)",
                    train_config=cfg.to_dict(), test_error=err, stn_test_error=stn_error)
    # store the weights in float16 (the loader casts them back), with the checksum of what is stored
    from invariance import tensor_checksum
    from invariance.files import atomic_torch_save

    ck = torch.load(a.out, weights_only=True)
    ck["state_dict"] = half
    ck.pop("checksum", None)
    ck["checksum"] = tensor_checksum(ck)
    atomic_torch_save(a.out, ck)
    print(f"wrote {a.out}: rotated-MNIST test error {100 * err:.2f}% ({len(test)} images)")


if __name__ == "__main__":
    main()
