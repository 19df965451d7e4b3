"""Resolving a MODEL argument: built-in names, checkpoints, and ``FILE.py:NAME`` / ``module:NAME``.

Checkpoint contract
-------------------
A checkpoint is a ``torch.save`` dict, written atomically, with the keys::

    {"format": "invariance-checkpoint/1",
     "builder": "package.module:function",   # function(**config) -> nn.Module
     "config": {...},                          # JSON-like keyword arguments of the builder
     "state_dict": {...},                      # the model's weights
     ...,                                      # anything else (optimiser, epoch, metrics)
     "checksum": "sha256:..."}                 # of every tensor above (names, dtypes, shapes, bytes)

:func:`load_checkpoint` verifies the checksum (a checkpoint whose bytes were corrupted after it
was written is refused; checkpoints written before checksums existed load without the check)
and refuses weights that are not finite (NaN or inf: a diverged run); :func:`save_checkpoint`
refuses to write such weights in the first place.

Loading runs no code from the file. The file is read with the weights-only unpickler
(:func:`invariance.files.safe_torch_load`: tensors and plain containers), and its ``builder``
must be a *registered* builder: the package's own (:data:`BUILTIN_BUILDERS`, for example
``stn:build_model``, so that this package rebuilds a model trained by ``stn`` without importing
it statically: the dependency stays one way) or one registered in code with
:func:`register_builder`. Any other name (``os:system``, a module of the file's choosing) is
refused with :class:`UntrustedCheckpointError`, which says how to allow it:
``trust_code=True`` (``--trust-code`` on the command line) for a file whose source you trust.

The built-in models are a plain table (networks imported only when built); users add theirs with :func:`register_model`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import TRUST_HINT, UntrustedFileError, atomic_torch_save, safe_torch_load

__all__ = ["CHECKPOINT_FORMAT", "ModelInfo", "register_model", "builtin_models", "load_model", "load_weights", "ZOOS",
           "build_from_checkpoint",
           "non_finite_weight", "register_builder", "registered_builders", "BUILTIN_BUILDERS",
           "save_checkpoint", "load_checkpoint", "tensor_checksum", "CheckpointError", "UntrustedCheckpointError"]

CHECKPOINT_FORMAT = "invariance-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not in the expected format."""


class UntrustedCheckpointError(CheckpointError, UntrustedFileError):
    """A checkpoint would run code to load (a pickled object, or a builder that is not registered)."""


#: The builders a checkpoint may name without ``trust_code``: this distribution's own, by the
#: names checkpoints use (including names from before the implementation modules became private).
BUILTIN_BUILDERS: dict[str, str] = {
    "invariance:mnist_cnn": "invariance:mnist_cnn",
    "invariance.zoo:mnist_cnn": "invariance:mnist_cnn",
    "stn:build_model": "stn:build_model",
    "stn.models:build_model": "stn:build_model",
}
_USER_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_builder(name: str, builder: Callable[..., nn.Module]) -> None:
    """Allow checkpoints that name ``name`` as their builder to be rebuilt with ``builder(**config)``.

    The registry is written in code, never from a file, so a checkpoint cannot widen it.

    >>> register_builder("my-package:my_net", lambda width=4: torch.nn.Conv2d(1, width, 3))
    >>> "my-package:my_net" in registered_builders()
    True
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"name: expected a non-empty string such as 'package:function', got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder: expected a callable returning an nn.Module, got {type(builder).__name__}")
    _USER_BUILDERS[name] = builder


def registered_builders() -> list[str]:
    """The builder names a checkpoint may use without ``trust_code`` (built-in, then registered)."""
    return [*BUILTIN_BUILDERS, *_USER_BUILDERS]


def _builder(path, name, trust_code: bool) -> Callable[..., nn.Module]:
    """The callable a checkpoint's ``builder`` names, if it is registered (or the file is trusted)."""
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: corrupt checkpoint: builder is a {type(name).__name__}, not a name")
    if name in _USER_BUILDERS:
        return _USER_BUILDERS[name]
    if name in BUILTIN_BUILDERS:
        return _import_object(BUILTIN_BUILDERS[name])
    if not trust_code:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise UntrustedCheckpointError(
            f"{path}: refused: the checkpoint names the builder {shown!r}, which is not registered "
            f"(registered: {', '.join(registered_builders())}); importing and calling it could run any code; "
            f"register it in your code with invariance.register_builder, or {TRUST_HINT}")
    return _import_object(name)


@dataclass
class ModelInfo:
    """A model of the registry: its factory and the images it is meant to be measured on.

    ``factory`` is a callable returning the module, or ``"module:name"`` naming one (imported
    when the model is built, so that the registry imports none of the networks).
    """

    factory: Callable[[], nn.Module] | str
    description: str
    default_images: str = "digits"
    default_layers: str = "all"
    extras: dict = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A fresh instance of the model."""
        f = _import_object(self.factory) if isinstance(self.factory, str) else self.factory
        return f()


_LAYERS_CNN = "conv1,relu1,conv2,relu2"
#: The built-in models: plain entries (the networks are imported only when one is built).
_BUILTIN: dict[str, ModelInfo] = {
    "toy-wm": ModelInfo("invariance.toys:WMNet", "W and M detectors (the M filter is the W filter rotated 180°) "
                        "with a rectifying threshold", default_images="glyphs", default_layers="detect,rectify,pool"),
    "toy-scale": ModelInfo("invariance.toys:GaussianJetNet", "scale-normalised Gaussian derivatives (2-jet) at one "
                           "scale, sigma = 2 px", default_images="blobs", default_layers="jet"),
    "toy-scale-channels": ModelInfo("invariance.toys:ScaleChannelNet", "the 2-jet at 5 scales (1 to 4 px): a "
                                    "rescaling shifts the channel axis", default_images="blobs", default_layers="jet"),
    "toy-isotropic": ModelInfo("invariance.toys:IsotropicNet", "rotationally symmetric filters (Gaussians, "
                               "Laplacians): rotation covariant", default_images="blobs", default_layers=_LAYERS_CNN),
    "toy-p4": ModelInfo("invariance.toys:P4Net", "p4 lifting layer: the four 90° rotations of one filter; 90° "
                        "rotations permute channels", default_images="blobs", default_layers="lift,relu"),
    "toy-c8": ModelInfo("invariance.toys:C8Net", "c8 lifting layer of steerable filters at 45° steps; 45° "
                        "rotations permute channels", default_images="blobs", default_layers="lift,relu"),
    "toy-circular": ModelInfo("invariance.toys:CircularNet", "stride-1 convolutions with circular padding: exactly "
                              "translation covariant", default_images="blobs", default_layers=_LAYERS_CNN),
    "mnist-cnn": ModelInfo("invariance:pretrained_mnist_cnn", "the paper's MNIST CNN trained on rotated digits "
                           "(shipped)", default_images="digits", default_layers=_LAYERS_CNN),
    "mnist-cnn-random": ModelInfo("invariance:random_mnist_cnn", "the same CNN, random weights (seed 0)",
                                  default_images="digits", default_layers=_LAYERS_CNN),
}
_REGISTRY: dict[str, ModelInfo] = {}  # models registered by users


def register_model(name: str, info: ModelInfo) -> None:
    """Add a model to the registry under ``name`` (then ``load_model(name)`` and the CLI know it).

    >>> register_model("my-net", ModelInfo(lambda: torch.nn.Conv2d(1, 2, 3), "a test network"))
    >>> "my-net" in builtin_models()
    True
    """
    if not isinstance(info, ModelInfo):
        raise TypeError(f"info: expected a ModelInfo, got {type(info).__name__}")
    _REGISTRY[name] = info


def builtin_models() -> dict[str, ModelInfo]:
    """Name -> :class:`ModelInfo` of every model of the registry (built-in, then registered)."""
    return {**_BUILTIN, **_REGISTRY}


def tensor_checksum(obj: Any) -> str:
    """``"sha256:..."`` of every tensor in ``obj`` (nested dicts / lists / tuples, in order): its
    path, dtype, shape and bytes. Other values are not covered.

    >>> a = {"w": torch.zeros(2, 3)}
    >>> tensor_checksum(a) == tensor_checksum({"w": torch.zeros(2, 3)}) != tensor_checksum({"w": torch.ones(2, 3)})
    True
    """
    h = hashlib.sha256()

    def walk(o, where: str) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"{where}|{t.dtype}|{tuple(o.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{where}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{where}/{i}")

    walk(obj, "")
    return "sha256:" + h.hexdigest()


def non_finite_weight(state_dict: dict) -> str | None:
    """Name of the first floating-point tensor holding NaN or inf, else None."""
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not bool(
                torch.isfinite(t).all()):
            return name
    return None


def save_checkpoint(path: str | os.PathLike, model: nn.Module, builder: str, config: dict, **extra: Any) -> Path:
    """Write a self-describing checkpoint atomically, with the checksum of its tensors (see the
    module docstring). Raises :class:`CheckpointError` (and writes nothing) if a weight is NaN or inf."""
    state = model.state_dict()
    bad = non_finite_weight(state)
    if bad is not None:
        raise CheckpointError(f"{path}: not written: the weight {bad!r} holds NaN or inf values (training diverged)")
    obj = {"format": CHECKPOINT_FORMAT, "builder": builder, "config": dict(config), "state_dict": state, **extra}
    obj.pop("checksum", None)
    obj["checksum"] = tensor_checksum(obj)
    return atomic_torch_save(path, obj)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, trust_code: bool = False) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for bad files.

    No code from the file runs: it is read with the weights-only unpickler, and a file holding
    other Python objects raises :class:`UntrustedCheckpointError` unless ``trust_code`` is true.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a checkpoint file path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = safe_torch_load(path, map_location, what="checkpoint", trust_code=trust_code)
    except UntrustedFileError as exc:
        raise UntrustedCheckpointError(str(exc).removeprefix("checkpoint: ")) from None
    except ValueError as exc:  # truncated zip, unpickling errors, ...
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint "
                              f"({str(exc).partition('(')[2].rstrip(')') or 'unreadable'})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an {CHECKPOINT_FORMAT} checkpoint")
    for key in ("builder", "config", "state_dict"):
        if key not in obj:
            raise CheckpointError(f"{path}: checkpoint lacks the key {key!r}")
    if "checksum" in obj:
        stored = obj.pop("checksum")
        if tensor_checksum(obj) != stored:
            raise CheckpointError(f"{path}: corrupt checkpoint: its tensors do not match the checksum written "
                                  f"with them (the file changed after it was saved)")
        obj["checksum"] = stored
    if not isinstance(obj["state_dict"], dict):
        raise CheckpointError(f"{path}: corrupt checkpoint: state_dict is a {type(obj['state_dict']).__name__}")
    bad = non_finite_weight(obj["state_dict"])
    if bad is not None:
        raise CheckpointError(f"{path}: the weight {bad!r} holds NaN or inf values (the run diverged); "
                              f"retrain it, e.g. with a smaller learning rate")
    return obj


# builders named by checkpoints written before the implementation modules became private
_MOVED = {"invariance.zoo": "invariance", "stn.models": "stn"}


def _import_object(spec: str):
    target, _, name = spec.rpartition(":")
    target = _MOVED.get(target, target)
    if target.endswith(".py") or os.sep in target:
        file = Path(target)
        if not file.is_file():
            raise ValueError(f"model: file {target!r} not found")
        modname = f"_invariance_user_{abs(hash(str(file.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(modname, file)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"model: cannot import {target!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # SyntaxError, an ImportError inside, any error at import time
            raise ValueError(f"model: importing {target!r} failed: {_one_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"model: cannot import module {target!r} ({_one_line(exc)})") from None
        except Exception as exc:
            raise ValueError(f"model: importing module {target!r} failed: {_one_line(exc)}") from None
    if not hasattr(module, name):
        raise ValueError(f"model: {target!r} has no attribute {name!r}")
    return getattr(module, name)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (with the line of a SyntaxError)."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def build_from_checkpoint(path: str | os.PathLike, map_location="cpu", *, trust_code: bool = False) -> nn.Module:
    """The model a checkpoint describes: its registered builder called with its config, then its weights.

    Without ``trust_code`` nothing from the file runs (see the module docstring)."""
    ck = load_checkpoint(path, map_location, trust_code=trust_code)
    builder = _builder(path, ck["builder"], trust_code)
    if not isinstance(ck["config"], dict) or not all(isinstance(k, str) for k in ck["config"]):
        raise CheckpointError(f"{path}: config is not a dict")
    try:
        model = builder(**ck["config"])
    except Exception as exc:
        raise CheckpointError(f"{path}: rebuilding the model with {ck['builder']} failed: {_one_line(exc)}") from None
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    return model


ZOOS = ("torchvision", "timm")
"""Model zoos ``load_model`` reads as ``ZOO:NAME`` (random weights drawn with seed 0, so the same
network in every process; nothing is downloaded: pass local weights to :func:`load_weights`)."""


def _zoo_model(zoo: str, name: str) -> nn.Module:
    """``torchvision:NAME`` / ``timm:NAME`` built with random weights drawn with seed 0, the same in
    every process (no download)."""
    try:
        lib = importlib.import_module(zoo)
        if zoo == "torchvision":
            lib = importlib.import_module("torchvision.models")
    except ImportError:
        raise ValueError(f"model: {zoo}:{name} needs the package {zoo} (pip install 'invariance[models]')") from None
    known = lib.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"model: {zoo} has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                  else f" ({zoo}'s list_models() names them)"))
    try:
        with torch.random.fork_rng(devices=[]):  # the same random weights in every process (seed 0)
            torch.manual_seed(0)
            return (lib.get_model(name, weights=None) if zoo == "torchvision"
                    else lib.create_model(name, pretrained=False))
    except Exception as exc:
        raise ValueError(f"model: building {zoo}:{name} failed: {_one_line(exc)}") from None


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local state dict (``torch.save(model.state_dict(), path)``) into ``model``; nothing in
    the file runs (the weights-only unpickler), and weights that do not fit are a one-line error.

    >>> import tempfile, pathlib
    >>> net = torch.nn.Conv2d(1, 2, 3)
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "w.pt"; torch.save(net.state_dict(), f)
    >>> other = load_weights(torch.nn.Conv2d(1, 2, 3), f)
    >>> bool(torch.equal(other.weight, net.weight))
    True
    """
    state = safe_torch_load(path, what="weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"weights: {os.fspath(path)} is not a state dict (names -> tensors)")
    bad = non_finite_weight(state)
    if bad is not None:
        raise ValueError(f"weights: {os.fspath(path)}: tensor {bad!r} holds NaN or inf")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"weights: {os.fspath(path)} does not fit the model ({str(exc).splitlines()[0]})") from None
    return model


def load_model(spec: str | os.PathLike | nn.Module, *, trust_code: bool = False) -> nn.Module:
    """Resolve ``spec`` to an ``nn.Module`` in eval mode.

    ``spec`` may be a built-in name (see :func:`builtin_models`), a checkpoint path,
    ``torchvision:NAME`` / ``timm:NAME`` (random weights, :data:`ZOOS`), or
    ``FILE.py:NAME`` / ``package.module:NAME`` naming an ``nn.Module`` or a callable returning one
    (your own code: it is imported and run). A checkpoint runs no code from the file unless
    ``trust_code`` is true (see the module docstring).

    >>> load_model("toy-wm").__class__.__name__
    'WMNet'
    """
    if isinstance(spec, nn.Module):
        return spec.eval()
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"model: expected an nn.Module, a built-in name, a checkpoint path or FILE.py:NAME, "
                        f"got {type(spec).__name__}")
    if not spec.strip():
        raise ValueError("model: empty name; valid choices: a checkpoint file, FILE.py:NAME, package.module:NAME, "
                         f"or a built-in name ({', '.join(builtin_models())})")
    models = builtin_models()
    if spec in models:
        return models[spec].build().eval()
    if spec.endswith(".py") and Path(spec).is_file():
        raise ValueError(f"model: {spec!r} is a Python file; name the nn.Module or the function returning one in "
                         f"it: {spec}:NAME")
    if Path(spec).is_dir():
        raise ValueError(f"model: {spec!r} is a folder; valid choices: a checkpoint file, FILE.py:NAME, "
                         f"package.module:NAME, or a built-in name ({', '.join(models)})")
    if Path(spec).is_file():
        try:
            return build_from_checkpoint(spec, trust_code=trust_code).eval()
        except UntrustedCheckpointError as exc:
            raise UntrustedCheckpointError(f"model: {exc}") from None
        except CheckpointError as exc:
            raise CheckpointError(f"model: {exc}") from None
    zoo, _, name = spec.partition(":")
    if zoo in ZOOS and name:
        return _zoo_model(zoo, name).eval()
    if ":" in spec:
        obj = _import_object(spec)
        if isinstance(obj, nn.Module):
            model = obj
        elif callable(obj):
            try:
                model = obj()
            except Exception as exc:
                raise ValueError(f"model: calling {spec!r} failed: {_one_line(exc)}") from None
        else:
            model = None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: {spec!r} is neither an nn.Module nor a callable returning one")
        return model.eval()
    raise ValueError(
        f"model: unknown model {spec!r}; valid choices: a checkpoint file, FILE.py:NAME, "
        f"package.module:NAME, or a built-in name ({', '.join(models)})"
    )
