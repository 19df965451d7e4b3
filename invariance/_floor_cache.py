"""The interpolation floor, computed once per (images, transformation, search) and kept on disk.

The floor (docs/definitions.md, "Calibration") depends on the images, the transformation, the
search family and settings and the evaluation disk, never on the model or the layer. A comparison
of models, a per-layer benchmark (one process per layer) or a sweep therefore asks for the same
floor again and again; :func:`cached_floor` computes it the first time and reads it back after.

The key is a sha256 of everything the value depends on: the images' bytes, dtype and shape, the
transformation's matrix, the search family, the settings' ``repr``, the disk radius, the device
type, the torch version and **the source of this package** (a changed search never reads a floor
that the old one computed). One file per key, ``<folder>/<key[:2]>/<key>.npy``: the per-image floors,
float64, written atomically, read without pickle (loading never runs code). A file that cannot be
read as exactly that is computed again and replaced.

Folder: ``$XDG_CACHE_HOME/invariance/floors`` or ``~/.cache/invariance/floors``
(:func:`invariance.files.user_cache_dir`); ``measure(floor_cache=False)`` (``--no-floor-cache``) turns it off,
``floor_cache=PATH`` puts it elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write, user_cache_dir

__all__ = ["cached_floor", "floor_cache_dir", "floor_key"]

_VERSION = b"invariance-floor-v1"


@functools.cache
def _code_hash() -> bytes:
    """sha256 of every module of this package (read once per process: a few ms)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.digest()


def floor_key(images: torch.Tensor, t_img: torch.Tensor, family: str, config, mask_radius) -> str:
    """The cache key (hex sha256) of the floor of ``images`` under ``t_img`` searched by ``family``."""
    h = hashlib.sha256(_VERSION)
    h.update(_code_hash())
    h.update(torch.__version__.encode())
    x = images.detach().to("cpu").contiguous()
    h.update(f"{x.dtype}|{tuple(x.shape)}|{images.device.type}|{family}|{mask_radius!r}|{config!r}".encode())
    h.update(x.numpy().tobytes() if x.dtype != torch.bfloat16 else x.float().numpy().tobytes())
    h.update(t_img.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def floor_cache_dir(floor_cache) -> Path | None:
    """The folder of ``measure``'s ``floor_cache`` argument: True the user cache, False None, else the path."""
    if floor_cache is False:
        return None
    if floor_cache is True:
        return user_cache_dir() / "floors"
    return Path(os.fspath(floor_cache)).expanduser()


def _read(path: Path, n: int) -> torch.Tensor | None:
    try:
        with open(path, "rb") as f:
            v = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if v.dtype != np.float64 or v.shape != (n,):
        return None
    return torch.from_numpy(v.copy())


def cached_floor(folder: Path | None, key: str, n: int,
                 compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """``(floors (n,) float64, read from the cache)``: the file of ``key`` in ``folder`` when it holds
    ``n`` floats, else ``compute()`` (written for next time; a folder that cannot be written is not
    an error, the floor is then just not kept)."""
    if folder is None:
        return compute(), False
    path = folder / key[:2] / f"{key}.npy"
    got = _read(path, n)
    if got is not None:
        return got, True
    value = compute().detach().to("cpu", torch.float64)
    arr = value.numpy()
    try:
        atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False))
    except OSError:
        pass
    return value, False
