"""Small real networks and data shipped with the package (for the demo and the notebooks).

* :func:`load_digits`: 500 MNIST test digits (50 per class), see ``invariance/data/README.md``.
* :func:`mnist_cnn`: the paper's MNIST classifier (Conv 9x9 64 -> max-pool 2 -> ReLU ->
  Conv 7x7 64 -> max-pool 2 -> ReLU -> linear); :func:`pretrained_mnist_cnn` loads the shipped
  weights, trained on rotated digits by the project's ``stn`` training code
  (``scripts/train_demo_cnn.py``).
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import nn

from .models import ModelInfo, _build_from_checkpoint, register_model

__all__ = ["load_digits", "mnist_cnn", "pretrained_mnist_cnn", "PRETRAINED_PATH"]

PRETRAINED_PATH = resources.files("invariance") / "data" / "mnist_cnn.pt"


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped digits: ``(images uint8 (500, 28, 28), labels int64 (500,))``.

    >>> imgs, labels = load_digits()
    >>> tuple(imgs.shape), torch.bincount(labels).tolist()[:3]
    ((500, 28, 28), [50, 50, 50])
    """
    with resources.as_file(resources.files("invariance") / "data" / "digits.npz") as p:
        d = np.load(p)
        return torch.from_numpy(d["images"].copy()), torch.from_numpy(d["labels"].astype(np.int64))


def mnist_cnn(c1: int = 64, c2: int = 64, n_classes: int = 10, size: int = 28) -> nn.Sequential:
    """The paper's MNIST classifier: Conv 9x9 ``c1`` -> max-pool 2 -> ReLU -> Conv 7x7 ``c2`` ->
    max-pool 2 -> ReLU -> linear (``same`` padding, as in :mod:`stn`'s ``mnist`` classifier).

    Layer names: ``conv1, pool1, relu1, conv2, pool2, relu2, flatten, fc``.

    >>> mnist_cnn()(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    s = size // 2 // 2
    return nn.Sequential(
        _named(
            conv1=nn.Conv2d(1, c1, 9, padding=4), pool1=nn.MaxPool2d(2), relu1=nn.ReLU(),
            conv2=nn.Conv2d(c1, c2, 7, padding=3), pool2=nn.MaxPool2d(2), relu2=nn.ReLU(),
            flatten=nn.Flatten(), fc=nn.Linear(c2 * s * s, n_classes),
        )
    )


def _named(**mods):
    from collections import OrderedDict

    return OrderedDict(mods)


def pretrained_mnist_cnn() -> nn.Module:
    """The shipped CNN trained on rotated digits (raises FileNotFoundError if not built)."""
    with resources.as_file(PRETRAINED_PATH) as p:
        if not p.is_file():
            raise FileNotFoundError(f"model: {p} is missing; rebuild it with scripts/train_demo_cnn.py")
        return _build_from_checkpoint(p).eval()


register_model("mnist-cnn", ModelInfo(pretrained_mnist_cnn, "the paper's MNIST CNN trained on rotated digits (shipped)",
                                      default_images="digits", default_layers="conv1,relu1,conv2,relu2"))
register_model("mnist-cnn-random", ModelInfo(lambda: _seeded(mnist_cnn), "the same CNN, random weights (seed 0)",
                                             default_images="digits", default_layers="conv1,relu1,conv2,relu2"))


def _seeded(factory, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()
