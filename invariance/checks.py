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

__all__ = ["check_float", "check_finite", "check_matrix", "check_size", "check_images", "check_model_channels",
           "check_int", "check_number", "check_seed", "resolve_device", "SEED_MAX"]

#: Seeds are unsigned 32-bit integers (numpy's and torch's generators both take them).
SEED_MAX = 2**32 - 1


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


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` is an integer (not a bool, not a float) within ``[minimum, maximum]``; returns it.

    >>> check_int(3, "n_boot", minimum=1)
    3
    >>> check_int(0, "n_boot", minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: n_boot: must be an integer >= 1, got 0
    """
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()
            and value.dtype != torch.bool):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: must be an integer{_range(minimum, maximum)}, got {_show(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: must be an integer{_range(minimum, maximum)}, got {value}")
    return value


def check_number(value, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 positive: bool = False) -> float:
    """``value`` is a finite real number (not a bool or a string) within ``[minimum, maximum]``
    (strictly above 0 when ``positive``); returns it as a float.

    >>> check_number(0.5, "min_overlap", minimum=0, maximum=1)
    0.5
    >>> check_number(float("nan"), "mask_radius", positive=True)
    Traceback (most recent call last):
    ...
    ValueError: mask_radius: must be a finite number > 0, got nan
    """
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: must be a number{_range(minimum, maximum, positive)}, got {_show(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name}: must be a finite number{_range(minimum, maximum, positive)}, got a number "
                         f"too large for a float") from None
    bad = value != value or value in (float("inf"), float("-inf"))
    bad = bad or (positive and value <= 0)
    bad = bad or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)
    if bad:
        raise ValueError(f"{name}: must be a finite number{_range(minimum, maximum, positive)}, got {value!r}")
    return value


def _show(value) -> str:
    """A value for a one-line message: its repr on one line, shortened (tensors and arrays by type and shape)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return repr(value.item())
    if isinstance(value, torch.Tensor) or type(value).__name__ == "ndarray":
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _range(minimum, maximum, positive: bool = False) -> str:
    def num(v) -> str:
        return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}"

    if positive and maximum is None:
        return " > 0"
    if minimum is not None and maximum is not None:
        return f" in {num(minimum)}..{num(maximum)}"
    if minimum is not None:
        return f" >= {num(minimum)}"
    if maximum is not None:
        return f" <= {num(maximum)}"
    return ""


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` is an integer in ``0..2**32 - 1``; returns it."""
    return check_int(seed, name, minimum=0, maximum=SEED_MAX)


def resolve_device(device, name: str = "device") -> torch.device | None:
    """``None`` (follow the inputs), a ``torch.device``, or ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
    ``"auto"`` (CUDA when present) -> a ``torch.device`` that exists on this machine.

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("tpu")
    Traceback (most recent call last):
    ...
    ValueError: device: unknown device 'tpu'; valid choices: cpu, cuda, cuda:N, auto
    """
    import re

    if device is None:
        return None
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:(?:0|[1-9][0-9]{0,3})", device, flags=re.ASCII):
            raise ValueError(f"{name}: unknown device {device!r}; valid choices: cpu, cuda, cuda:N, auto")
        dev = torch.device(device)
    else:
        raise TypeError(f"{name}: expected a device name (cpu, cuda, cuda:N, auto) or a torch.device, "
                        f"got {type(device).__name__}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: CUDA requested but torch.cuda.is_available() is False; valid choices: cpu, "
                             f"auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {dev} does not exist; this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"{name}: unsupported device {str(dev)!r}; valid choices: cpu, cuda, cuda:N, auto")
    return dev
