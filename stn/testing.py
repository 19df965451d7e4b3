"""Helpers for tests: tiny fake IDX data sets, so that training can be tested without the real data.

>>> import tempfile, torch
>>> from invariance.datasets import load_split
>>> root = write_fake_dataset(tempfile.mkdtemp(), n=50)
>>> s = load_split("mnist", "train", root=root)
>>> s.images.shape, s.protocol
(torch.Size([40, 28, 28]), 'mnist-50 stratified 40/10 (seed 0)')
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["write_fake_dataset", "train_argv"]


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_dataset(root: str | os.PathLike, name: str = "mnist", n: int = 60, seed: int = 0,
                       n_train: int | None = None) -> Path:
    """Write ``n`` fake 28x28 test images (and ``n_train`` training images) as gzip IDX under ``root/name``.

    Each image is a class-dependent bar pattern plus noise inside the central 20x20 box (so clutter
    patches cut from it are not empty); labels cycle through 0..9. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)

    def make(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (np.arange(count) % 10).astype(np.uint8)
        images = np.zeros((count, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            img = rng.integers(0, 80, (20, 20))
            img[2 + c: 4 + c, 3:17] = 255  # a horizontal bar whose height codes the class
            img[3:17, 15 - c // 2: 17 - c // 2] = 200  # and an off-centre vertical bar
            images[i, 4:24, 4:24] = img
        return images, labels

    splits = [("t10k", n)] + ([("train", n_train)] if n_train else [])
    for prefix, count in splits:
        images, labels = make(count)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    return Path(root)


def train_argv(out, root, *extra) -> list:
    """``stn train`` arguments for the smallest run that trains and tests (a CNN, one epoch, 32
    training and 16 test images of a fake data set under ``root``, on the CPU), plus ``extra``.

    >>> train_argv("runs/x", "data")[:3]
    ['train', '--arch', 'CNN']
    """
    return ["train", "--arch", "CNN", "--dataset", "mnist", "--transform", "rotation", "--epochs", "1",
            "--out", out, "--limit", "32", "--test-limit", "16", "--batch-size", "16", "--data-root", root,
            "--device", "cpu", "--no-progress", *extra]
