"""Argument checks shared by the package: each raises a one-line error that names the argument.

Public so that every module (and :mod:`stn`) validates the same way; they return nothing (or the
normalised value) and raise ``TypeError`` for a wrong type, ``ValueError`` for a wrong value.

>>> check_size((28, 28))
(28, 28)
>>> check_size((28, 0))
Traceback (most recent call last):
...
ValueError: size: H and W must be positive, got (28, 0)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["check_float", "check_finite", "check_matrix", "check_size", "check_images", "check_model_channels"]


def check_float(x: torch.Tensor, name: str) -> None:
    """``x`` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """``x`` holds no NaN or infinite value."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")


def check_matrix(m: torch.Tensor, name: str = "matrix") -> None:
    """``m`` is a floating-point ``(..., 3, 3)`` tensor."""
    check_float(m, name)
    if m.dim() < 2 or m.shape[-2:] != (3, 3):
        raise ValueError(f"{name}: expected shape (..., 3, 3), got {tuple(m.shape)}")


def check_size(size: Sequence[int], name: str = "size") -> tuple[int, int]:
    """``size`` is ``(H, W)`` of two positive integers (ints or integer 0-d tensors); returns it as ints."""
    if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
        raise ValueError(f"{name}: expected (H, W), got {size!r}")
    vals = [int(s) if isinstance(s, torch.Tensor) and s.dim() == 0 and not s.is_floating_point() else s
            for s in size]
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"{name}: expected two integers (H, W), got {size!r}")
    h, w = (int(v) for v in vals)
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: H and W must be positive, got {(h, w)}")
    return h, w


def check_images(images: torch.Tensor, name: str = "images") -> None:
    """``images`` is a non-empty floating-point ``(B, C, H, W)`` tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name}: expected shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (B = 0)")
    if 0 in images.shape[1:]:
        raise ValueError(f"{name}: empty channel or spatial dimension in shape {tuple(images.shape)}")


def check_model_channels(model: nn.Module, images: torch.Tensor) -> None:
    """The model's first convolution takes as many channels as ``images`` have."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels != images.shape[1]:
                raise ValueError(f"images: the model's first convolution {name!r} expects "
                                 f"{mod.in_channels} channel(s), got images with {images.shape[1]}")
            return
