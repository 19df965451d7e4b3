"""The ``invariance`` command: ``measure``, ``demo``, ``layers`` and ``models``.

    invariance measure --model MODEL --transform SPEC [--layers L1,L2|all]
        [--images SOURCE] [--n-images N] [--search FAMILY]
        [--channels spatial,permutation,linear] [--out DIR] [--device cpu|cuda] [--seed S]
    invariance demo [--out DIR] [--quick]
    invariance layers --model MODEL [--images SOURCE]
    invariance models

Errors in the arguments are reported on one line (``invariance: error: ...``) with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["main", "load_images", "IMAGE_SOURCES"]

IMAGE_SOURCES = ("digits", "mnist", "fashion-mnist", "glyphs", "blobs", "FILE.npy", "FILE.pt")


class _Fail(Exception):
    pass


def load_images(source: str, n: int, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """Images ``(n, C, H, W)`` float in [0, 1] from a SOURCE (see :data:`IMAGE_SOURCES`).

    ``digits`` is the stratified MNIST subset shipped with the package; ``mnist`` and
    ``fashion-mnist`` are the held-out test images of :func:`invariance.datasets.load_split`
    (needs the data, see ``INVARIANCE_DATA``); ``glyphs`` and ``blobs`` are generated scenes of
    the toy networks; a ``.npy`` / ``.pt`` file holds ``(N, H, W)`` or ``(N, C, H, W)`` images.
    """
    from .measure import as_image_batch

    if n < 1:
        raise ValueError(f"n_images: must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    path = Path(source)
    if source in ("glyphs", "blobs"):
        from .toys import make_images

        kw = {} if size is None else {"size": size}
        return make_images(source, n, seed=seed, **kw)
    if source == "digits":
        from .zoo import load_digits

        imgs, _ = load_digits()
    elif source in ("mnist", "fashion-mnist"):
        from .datasets import load_split

        imgs = load_split(source, "test").images
    elif path.suffix in (".npy", ".pt"):
        if not path.is_file():
            raise ValueError(f"images: file {source!r} not found")
        try:
            arr = np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu")
        except Exception as exc:
            raise ValueError(f"images: cannot read {source!r} ({type(exc).__name__})") from None
        imgs = torch.as_tensor(arr)
    else:
        raise ValueError(f"images: unknown SOURCE {source!r}; valid choices: {', '.join(IMAGE_SOURCES)}")
    imgs = as_image_batch(imgs)
    if imgs.shape[0] > n:
        idx = np.sort(rng.choice(imgs.shape[0], size=n, replace=False))
        imgs = imgs[torch.as_tensor(idx)]
    return imgs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="invariance", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("measure", help="measure alignment errors of a model's feature maps")
    m.add_argument("--model", required=True, help="built-in name, checkpoint, FILE.py:NAME or module:NAME")
    m.add_argument("--transform", required=True, action="append",
                   help="SPEC: rotation:ANGLE, scale:FACTOR, translation:DX,DY, affine:a,b,c,d,e,f, "
                        "or a sweep rotation:-180..180:15 (repeatable; ';' joins several)")
    m.add_argument("--layers", default=None, help="comma-separated layer names, or 'all' (default: the model's)")
    m.add_argument("--images", default=None, help="SOURCE: " + ", ".join(IMAGE_SOURCES))
    m.add_argument("--n-images", type=int, default=64)
    m.add_argument("--search", default=None, help="search family (default: from the transformation)")
    m.add_argument("--channels", default="spatial,permutation,linear")
    m.add_argument("--mask-radius", type=float, default=1.0)
    m.add_argument("--out", default=None, help="folder for report.json, report.csv and figures")
    m.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--n-boot", type=int, default=1000)
    m.add_argument("--quick", action="store_true", help="coarser search grid (faster)")

    d = sub.add_parser("demo", help="the paper's central result on an embedded default (offline)")
    d.add_argument("--out", default="demo-report")
    d.add_argument("--quick", action="store_true", help="fewer images and a coarser grid (CI)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--seed", type=int, default=0)

    ly = sub.add_parser("layers", help="list a model's layers with 4-D outputs and their frames")
    ly.add_argument("--model", required=True)
    ly.add_argument("--images", default=None)

    sub.add_parser("models", help="list the built-in models")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device: unknown device {name!r}; valid choices: cpu, cuda, auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device: CUDA requested but torch.cuda.is_available() is False")
    return torch.device(name)


def _model_defaults(spec: str):
    from .models import builtin_models

    info = builtin_models().get(spec)
    return (info.default_images, info.default_layers) if info else ("digits", "all")


def cmd_measure(a) -> int:
    from .measure import measure, parse_transforms
    from .models import load_model
    from .search import SearchConfig

    device = _device(a.device)
    transforms = parse_transforms(a.transform)
    model = load_model(a.model)
    default_images, default_layers = _model_defaults(a.model)
    images = load_images(a.images or default_images, a.n_images, seed=a.seed)
    cfg = SearchConfig(seed=a.seed)
    if a.quick:
        cfg = SearchConfig(seed=a.seed, n_angles=36, refine_steps=20, log2_scales=tuple(np.arange(-2, 2.01, 0.25)))
    report = measure(model, images.to(device), transforms, layers=a.layers or default_layers, search=a.search,
                     channels=a.channels, mask_radius=a.mask_radius, config=cfg, n_boot=a.n_boot, seed=a.seed,
                     device=device, progress=True, model_name=a.model)
    print(report.table())
    if a.out:
        paths = report.save(a.out)
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_layers(a) -> int:
    from .features import extract_features
    from .models import load_model

    model = load_model(a.model)
    default_images, _ = _model_defaults(a.model)
    images = load_images(a.images or default_images, 1)
    feats, frames = extract_features(model, images, "all")
    print(f"{'layer':24s} {'shape':18s} {'stride':12s} {'offset':14s} frame")
    for name, f in feats.items():
        fr = frames[name]
        print(f"{name:24s} {str(tuple(f.shape[1:])):18s} {str(fr.stride):12s} {str(fr.offset):14s} "
              f"{'traced' if fr.exact else 'assumed'}")
    return 0


def cmd_models(a) -> int:
    from .models import builtin_models

    for name, info in builtin_models().items():
        print(f"{name:20s} {info.description}  [images: {info.default_images}]")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(a.out, quick=a.quick, device=_device(a.device), seed=a.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    handlers = {"measure": cmd_measure, "layers": cmd_layers, "models": cmd_models, "demo": cmd_demo}
    try:
        return handlers[a.command](a)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        parser.exit(2, f"invariance: error: {msg}\n")
    except KeyboardInterrupt:
        parser.exit(130, "invariance: interrupted\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
