"""Resolving a MODEL argument: built-in names, checkpoints, and ``FILE.py:NAME`` / ``module:NAME``.

Checkpoint contract
-------------------
A checkpoint is a ``torch.save`` dict, written atomically, with the keys::

    {"format": "invariance-checkpoint/1",
     "builder": "package.module:function",   # function(**config) -> nn.Module
     "config": {...},                          # JSON-like keyword arguments of the builder
     "state_dict": {...},                      # the model's weights
     ...}                                      # anything else (optimiser, epoch, metrics)

so that this package can rebuild a model trained by another package (for example ``stn``)
without importing it statically: the dependency stays one way.

Built-in models register themselves with :func:`register_model`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_torch_save

__all__ = ["CHECKPOINT_FORMAT", "ModelInfo", "register_model", "builtin_models", "load_model",
           "save_checkpoint", "load_checkpoint", "CheckpointError"]

CHECKPOINT_FORMAT = "invariance-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not in the expected format."""


@dataclass
class ModelInfo:
    """A built-in model: its factory and the images it is meant to be measured on."""

    factory: Callable[[], nn.Module]
    description: str
    default_images: str = "digits"
    default_layers: str = "all"
    extras: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, info: ModelInfo) -> None:
    _REGISTRY[name] = info


def builtin_models() -> dict[str, ModelInfo]:
    """Name -> :class:`ModelInfo` of every built-in model (the toy networks register on import)."""
    from . import toys, zoo  # noqa: F401  (register the analytic networks and the small CNN)

    return dict(_REGISTRY)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, builder: str, config: dict, **extra: Any) -> Path:
    """Write a self-describing checkpoint atomically (see the module docstring)."""
    obj = {"format": CHECKPOINT_FORMAT, "builder": builder, "config": dict(config),
           "state_dict": model.state_dict(), **extra}
    return atomic_torch_save(path, obj)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, unpickling errors, ...
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an {CHECKPOINT_FORMAT} checkpoint")
    for key in ("builder", "config", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"{path}: checkpoint lacks the key {key!r}")
    return obj


def _import_object(spec: str):
    target, _, name = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target:
        file = Path(target)
        if not file.is_file():
            raise ValueError(f"model: file {target!r} not found")
        modname = f"_invariance_user_{abs(hash(str(file.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(modname, file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"model: cannot import module {target!r} ({exc})") from None
    if not hasattr(module, name):
        raise ValueError(f"model: {target!r} has no attribute {name!r}")
    return getattr(module, name)


def _build_from_checkpoint(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    ck = load_checkpoint(path, map_location)
    builder = _import_object(ck["builder"])
    model = builder(**ck["config"])
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    return model


def load_model(spec: str | nn.Module) -> nn.Module:
    """Resolve ``spec`` to an ``nn.Module`` in eval mode.

    ``spec`` may be a built-in name (see :func:`builtin_models`), a checkpoint path, or
    ``FILE.py:NAME`` / ``package.module:NAME`` naming an ``nn.Module`` or a callable returning one.

    >>> load_model("toy-wm").__class__.__name__
    'WMNet'
    """
    if isinstance(spec, nn.Module):
        return spec.eval()
    models = builtin_models()
    if spec in models:
        return models[spec].factory().eval()
    if Path(spec).is_file():
        return _build_from_checkpoint(spec).eval()
    if ":" in spec:
        obj = _import_object(spec)
        model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: {spec!r} is neither an nn.Module nor a callable returning one")
        return model.eval()
    raise ValueError(
        f"model: unknown model {spec!r}; valid choices: a checkpoint file, FILE.py:NAME, "
        f"package.module:NAME, or a built-in name ({', '.join(models)})"
    )
