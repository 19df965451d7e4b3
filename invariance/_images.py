"""Images from a SOURCE: the shipped digits, the MNIST / Fashion-MNIST test sets, generated
scenes, or a ``.npy`` / ``.pt`` file read without running code from it (:func:`load_images`).

Shared by the command line (``--images``) and sweeps (``[[images]] source``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_images", "IMAGE_SOURCES", "DEFAULT_N_IMAGES"]

IMAGE_SOURCES = ("digits", "mnist", "fashion-mnist", "glyphs", "blobs", "FILE.npy", "FILE.pt")
#: Images measured when ``--n-images`` is not given (or all the SOURCE holds, if fewer).
DEFAULT_N_IMAGES = 64



def _read_file(path: Path, source: str):
    """The array a ``.npy`` / ``.pt`` file holds; no code from the file runs (no pickle in ``.npy``,
    the weights-only unpickler for ``.pt``)."""
    from .files import safe_torch_load

    if path.suffix == ".pt":
        return safe_torch_load(path, "cpu", what="images",
                               hint="save the images as a tensor (torch.save(images, FILE)) or a .npy array")
    try:
        _check_npy_header(path, source)
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("images: "):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"images: cannot read {source!r} ({type(exc).__name__}{': ' + first if first else ''})") \
            from None


def _check_npy_header(path: Path, source: str) -> None:
    """Refuse an ``.npy`` file whose header claims more data than the file holds (before reading any)."""
    with path.open("rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        start = f.tell()
    claimed = math.prod(shape) * dtype.itemsize
    held = path.stat().st_size - start
    if claimed > held:
        raise ValueError(f"images: {source!r} is truncated or corrupt: its header claims an array of shape {shape} "
                         f"({claimed:,} bytes), the file holds {held:,} bytes of data")


def _as_float_images(arr, source: str) -> torch.Tensor:
    """One array of images as floats: integers 0..255 scaled like uint8, booleans as 0 / 1; complex
    numbers, integers outside 0..255 and anything that is not one array are refused."""
    if isinstance(arr, dict):
        keys = ", ".join(map(repr, list(arr)[:5])) + (", ..." if len(arr) > 5 else "")
        raise ValueError(f"images: {source!r} holds a dict (keys {keys}), not an array of images; save the "
                         f"images themselves, (N, H, W) or (N, C, H, W)")
    if not isinstance(arr, (np.ndarray, torch.Tensor)):
        raise ValueError(f"images: {source!r} holds a {type(arr).__name__}, not an array of images "
                         f"(N, H, W) or (N, C, H, W)")
    if isinstance(arr, np.ndarray) and arr.dtype.kind not in "biufc":
        raise ValueError(f"images: {source!r} holds an array of {arr.dtype}; valid: floats, integers 0..255, bool")
    if isinstance(arr, torch.Tensor):
        if arr.is_complex():
            arr = arr.resolve_conj()
        arr = arr.detach().cpu().numpy() if arr.dtype != torch.bfloat16 else arr.detach().float().numpy()
    kind = arr.dtype.kind
    if kind == "c":
        raise ValueError(f"images: {source!r} holds complex numbers ({arr.dtype}); pass real images, e.g. the "
                         f"magnitude (np.abs) or the real part")
    if kind == "b":
        return torch.from_numpy(arr.astype(np.float32))
    if kind in "iu":
        if arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi > 255:
                raise ValueError(f"images: {source!r} holds {arr.dtype} values in {lo}..{hi}; integer images must "
                                 f"lie in 0..255 (they are scaled like uint8 to [0, 1]); convert other ranges to "
                                 f"floats in [0, 1]")
        return torch.from_numpy(arr.astype(np.float32) / np.float32(255.0))
    return torch.from_numpy(np.ascontiguousarray(arr))


def _n_available(source: str, imgs) -> int:
    return int(imgs.shape[0]) if getattr(imgs, "ndim", 0) >= 1 else 0


def load_images(source: str, n: int | None = None, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """Images ``(n, C, H, W)`` float in [0, 1] from a SOURCE (see :data:`IMAGE_SOURCES`).

    ``digits`` is the stratified MNIST subset shipped with the package; ``mnist`` and
    ``fashion-mnist`` are the held-out test images of :func:`invariance.datasets.load_split`
    (needs the data, see ``INVARIANCE_DATA``); ``glyphs`` and ``blobs`` are generated scenes of
    the toy networks; a ``.npy`` / ``.pt`` file holds ``(N, H, W)`` or ``(N, C, H, W)`` images:
    floats (kept in their precision), integers in 0..255 (scaled like ``uint8``) or booleans.

    ``n``: how many (a seeded random subset, in the SOURCE's order); ``None`` takes
    :data:`DEFAULT_N_IMAGES`, or all the SOURCE holds if fewer. More than the SOURCE holds is an
    error (``ValueError``) naming how many there are.
    """
    from ._measure import as_image_batch

    if n is not None and n < 1:
        raise ValueError(f"n_images: must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    path = Path(source)
    if source in ("glyphs", "blobs"):
        from .toys import make_images

        kw = {} if size is None else {"size": size}
        return make_images(source, DEFAULT_N_IMAGES if n is None else n, seed=seed, **kw)
    if source == "digits":
        from ._zoo import load_digits

        imgs, _ = load_digits()
    elif source in ("mnist", "fashion-mnist"):
        from .datasets import DatasetNotFoundError, load_split

        try:
            imgs = load_split(source, "test").images
        except DatasetNotFoundError as exc:
            raise ValueError(f"images: {exc}") from None
    elif path.suffix in (".npy", ".pt"):
        if path.is_dir():
            raise ValueError(f"images: {source!r} is a folder, not a {path.suffix} file")
        if not path.is_file():
            raise ValueError(f"images: file {source!r} not found")
        imgs = _as_float_images(_read_file(path, source), source)
    else:
        raise ValueError(f"images: unknown SOURCE {source!r}; valid choices: {', '.join(IMAGE_SOURCES)}")
    available = _n_available(source, imgs)
    if n is not None and available and n > available:
        raise ValueError(f"n_images: {n} asked for, but {source!r} holds only {available} image(s); "
                         f"valid: 1..{available}")
    imgs = as_image_batch(imgs)
    want = min(DEFAULT_N_IMAGES, imgs.shape[0]) if n is None else n
    if imgs.shape[0] > want:
        idx = np.sort(rng.choice(imgs.shape[0], size=want, replace=False))
        imgs = imgs[torch.as_tensor(idx)]
    return imgs
