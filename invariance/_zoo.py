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

from ._models import build_from_checkpoint

__all__ = ["load_digits", "MNIST_CNN_BLOCKS", "mnist_block", "mnist_cnn", "pretrained_mnist_cnn", "random_mnist_cnn",
           "PRETRAINED_PATH"]

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


#: The paper's MNIST classifier, block by block: ``(output channels, kernel)`` of each
#: Conv (``same`` padding) -> max-pool 2 -> ReLU block, then a linear layer. The one definition:
#: :func:`mnist_cnn` and :mod:`stn`'s ``mnist`` classifier are both built from it.
MNIST_CNN_BLOCKS: tuple[tuple[int, int], ...] = ((64, 9), (64, 7))


def mnist_block(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    """One block of the MNIST classifier: ``[Conv kxk (same padding), MaxPool 2, ReLU]``.

    >>> [type(m).__name__ for m in mnist_block(1, 64, 9)]
    ['Conv2d', 'MaxPool2d', 'ReLU']
    """
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.MaxPool2d(2), nn.ReLU()]


def mnist_cnn(c1: int | None = None, c2: int | None = None, n_classes: int = 10, size: int = 28) -> nn.Sequential:
    """The paper's MNIST classifier: Conv 9x9 ``c1`` -> max-pool 2 -> ReLU -> Conv 7x7 ``c2`` ->
    max-pool 2 -> ReLU -> linear (``same`` padding, as in :mod:`stn`'s ``mnist`` classifier).

    Layer names: ``conv1, pool1, relu1, conv2, pool2, relu2, flatten, fc``.

    >>> mnist_cnn()(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    (d1, k1), (d2, k2) = MNIST_CNN_BLOCKS
    c1, c2 = c1 or d1, c2 or d2
    s = size // 2 // 2
    conv1, pool1, relu1 = mnist_block(1, c1, k1)
    conv2, pool2, relu2 = mnist_block(c1, c2, k2)
    return nn.Sequential(_named(conv1=conv1, pool1=pool1, relu1=relu1, conv2=conv2, pool2=pool2, relu2=relu2,
                                flatten=nn.Flatten(), fc=nn.Linear(c2 * s * s, n_classes)))


def _named(**mods):
    from collections import OrderedDict

    return OrderedDict(mods)


def pretrained_mnist_cnn() -> nn.Module:
    """The shipped CNN trained on rotated digits (raises FileNotFoundError if not built)."""
    with resources.as_file(PRETRAINED_PATH) as p:
        if not p.is_file():
            raise FileNotFoundError(f"model: {p} is missing; rebuild it with scripts/train_demo_cnn.py")
        return build_from_checkpoint(p).eval()


def random_mnist_cnn(seed: int = 0) -> nn.Module:
    """:func:`mnist_cnn` with random weights drawn from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return mnist_cnn()
