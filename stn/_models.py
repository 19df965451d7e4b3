"""The paper's architectures, built from a configuration: CNN, STN-CX, STN-DLX, STN-SLX and iterative ones.

Architecture names
------------------
``CNN``
    the classifier alone.
``STN-C<depths>``
    a transformer at each listed depth X of the classifier that warps the classifier's own
    **feature maps** at that depth; its localisation head sees those maps. ``STN-C0`` warps the
    input with a small separate localisation CNN; ``STN-C0123`` has one transformer at each of
    the depths 0 to 3 (needs a classifier with at least 3 layers); a repeated depth
    (``STN-C11``) composes the transformations at that depth and resamples that depth's
    original map once.
``STN-DL<depths>``
    the transformer warps the **input**; its localisation network is a *fresh copy* of the
    first X classifier layers (own weights) followed by the localisation head.
``STN-SL<depths>``
    the transformer warps the **input**; its localisation network *shares* the classifier's
    first X layers (the same weights) and adds the localisation head; the classifier then runs
    on the aligned input. Several digits (``STN-SL0123``, ``STN-SL11``) iterate: each step
    predicts a correction from the currently aligned input, the corrections are composed, and
    the **original** input is resampled once by the composition (interpolation never
    accumulates). ``STN-DL<depths>`` iterates in the same way. Depth 0 needs no classifier
    layers, so ``STN-DL0 = STN-SL0 = STN-C0``.

Depth X means "after X classifier layers"; layer = one block of the classifier:

* ``mnist`` (Jaderberg et al.'s MNIST network): Conv 9x9 64 -> max-pool 2 -> ReLU,
  Conv 7x7 64 -> max-pool 2 -> ReLU, then linear; depths 0 to 2. ``same`` padding keeps every
  map on the input's field of view, so a normalised transformation means the same thing at
  every depth.
* ``svhn`` (in the style of the SVHN network): eight Conv 5x5 -> ReLU blocks with
  48-64-128-160-192-192-192-192 channels, max-pooling after every second block, dropout after
  each block, then FC 256 -> ReLU -> dropout -> linear; depths 0 to 8.

The localisation head (:class:`stn.LocalisationHead`: conv 5x5 32 -> pool -> ReLU,
twice, FC 32) is the same at every depth; only its input differs.

Example
-------
>>> import torch
>>> m = build_model("STN-SL1", family="rotation")
>>> m(torch.rand(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> parse_arch("STN-C0123")
ArchSpec(kind='C', depths=(0, 1, 2, 3))
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from invariance import MNIST_CNN_BLOCKS, mnist_block
from invariance.checks import check_int, check_number, check_size

from ._transformer import STN_FAMILIES, LocalisationHead, SpatialTransformer

__all__ = ["ArchSpec", "parse_arch", "valid_arch_names", "CLASSIFIERS", "classifier_layers",
           "STNClassifier", "Transforms", "build_model", "count_parameters"]

CLASSIFIERS: dict[str, int] = {"mnist": 2, "svhn": 8}
"""Classifier name -> number of layers (the largest usable depth)."""

_ARCH_RE = re.compile(r"^STN-(C|DL|SL)(\d+)$")


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture name: ``kind`` in ``CNN``, ``C``, ``DL``, ``SL``; ``depths`` in order."""

    kind: str
    depths: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return "CNN" if self.kind == "CNN" else f"STN-{self.kind}{''.join(map(str, self.depths))}"

    @property
    def warps_input(self) -> bool:
        return self.kind in ("DL", "SL") or (self.kind == "C" and set(self.depths) == {0})


def valid_arch_names(classifier: str = "mnist") -> str:
    """Human-readable list of the valid architecture names for ``classifier``."""
    d = CLASSIFIERS.get(classifier, 2)
    return (f"CNN, STN-C<depths>, STN-DL<depths>, STN-SL<depths> with <depths> one or more digits 0..{d} "
            f"(the {classifier!r} classifier has {d} layers; several digits = iterative / one transformer "
            f"per depth), e.g. CNN, STN-C0, STN-C1, STN-DL1, STN-SL1, STN-C012, STN-SL012, STN-SL11")


def parse_arch(name: str, max_depth: int | None = None, classifier: str = "mnist") -> ArchSpec:
    """Parse an architecture name; an invalid one raises a ``ValueError`` listing the valid forms.

    >>> parse_arch("STN-SL11")
    ArchSpec(kind='SL', depths=(1, 1))
    >>> parse_arch("STN-X1")
    Traceback (most recent call last):
    ...
    ValueError: arch: unknown architecture 'STN-X1'; valid choices: CNN, STN-C<depths>, ...
    """
    if not isinstance(name, str):
        raise ValueError(f"arch: expected a string, got {type(name).__name__}")
    if name.upper() == "CNN":
        return ArchSpec("CNN")
    m = _ARCH_RE.match(name.upper())
    if not m:
        raise ValueError(f"arch: unknown architecture {name!r}; valid choices: {valid_arch_names(classifier)}")
    kind, depths = m.group(1), tuple(int(c) for c in m.group(2))
    if max_depth is not None and max(depths) > max_depth:
        raise ValueError(f"arch: {name!r} uses depth {max(depths)} but the {classifier!r} classifier has only "
                         f"{max_depth} layers; valid choices: {valid_arch_names(classifier)}")
    if kind == "C" and list(depths) != sorted(depths):
        raise ValueError(f"arch: the depths of an STN-C architecture must be in increasing order "
                         f"(got {name!r}); valid choices: {valid_arch_names(classifier)}")
    return ArchSpec(kind, depths)


# ----------------------------------------------------------------------------- classifiers


def classifier_layers(classifier: str, in_channels: int, image_size: Sequence[int], n_classes: int,
                      dropout: float = 0.5):
    """Fresh ``(layers, head, shapes)`` of a classifier; ``shapes[X]`` is the ``(C, H, W)`` at depth X.

    >>> layers, head, shapes = classifier_layers("mnist", 1, (28, 28), 10)
    >>> shapes
    [(1, 28, 28), (64, 14, 14), (64, 7, 7)]
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier: unknown classifier {classifier!r}; valid choices: {', '.join(CLASSIFIERS)}")
    in_channels = check_int(in_channels, "in_channels", minimum=1)
    h, w = check_size(image_size, "image_size")
    n_classes = check_int(n_classes, "n_classes", minimum=2)
    check_number(dropout, "dropout", minimum=0, maximum=1)
    shapes = [(in_channels, h, w)]
    layers: list[nn.Module] = []
    if classifier == "mnist":
        for c_out, k in MNIST_CNN_BLOCKS:
            layers.append(nn.Sequential(*mnist_block(shapes[-1][0], c_out, k)))
            shapes.append((c_out, shapes[-1][1] // 2, shapes[-1][2] // 2))
        c, hh, ww = shapes[-1]
        if hh == 0 or ww == 0:
            raise ValueError(f"image_size: {tuple(image_size)} is too small for the mnist classifier (>= 4 px)")
        head = nn.Sequential(nn.Flatten(), nn.Linear(c * hh * ww, n_classes))
    else:
        widths = (48, 64, 128, 160, 192, 192, 192, 192)
        for i, c_out in enumerate(widths):
            block: list[nn.Module] = [nn.Conv2d(shapes[-1][0], c_out, 5, padding=2), nn.ReLU()]
            hh, ww = shapes[-1][1:]
            if i % 2 == 1:
                block.append(nn.MaxPool2d(2, ceil_mode=True))
                hh, ww = math.ceil(hh / 2), math.ceil(ww / 2)
            block.append(nn.Dropout(dropout))
            layers.append(nn.Sequential(*block))
            shapes.append((c_out, hh, ww))
        c, hh, ww = shapes[-1]
        head = nn.Sequential(nn.Flatten(), nn.Linear(c * hh * ww, 256), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(256, n_classes))
    return layers, head, shapes


@dataclass
class Transforms:
    """What the transformers did in one forward pass.

    Attributes:
        per_depth: ``[(depth, matrix (B, 3, 3))]`` the (composed) transformation applied at each
            depth, normalised frame of that depth (input -> output), in forward order.
        composed: ``(B, 3, 3)`` all of them composed (later depths applied after earlier ones),
            as a transformation of the input image's normalised frame (every map shares the
            input's field of view); ``None`` for the CNN.
    """

    per_depth: list
    composed: torch.Tensor | None


class _Localiser(nn.Module):
    """Localisation network of one transformer: optional private layers + the localisation head."""

    def __init__(self, layers: Sequence[nn.Module], head: LocalisationHead) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.head = head
        self.out_features = head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


class STNClassifier(nn.Module):
    """A classifier with spatial transformers placed as the architecture name says (see the module docstring).

    Build it with :func:`build_model` (whose keyword arguments are stored in ``self.config``, so a
    checkpoint can rebuild it). ``forward(x)`` returns logits; ``forward_with_transforms(x)``
    returns ``(logits, Transforms)``. Parameters of the localisation networks (everything under
    ``transformers``; the shared layers of STN-SLX belong to the classifier) are returned by
    :meth:`localisation_parameters`, the rest by :meth:`classifier_parameters`.
    """

    def __init__(self, arch: str = "CNN", *, classifier: str = "mnist", in_channels: int = 1,
                 image_size: Sequence[int] = (28, 28), n_classes: int = 10, family: str = "affine",
                 loc_channels: int = 32, loc_hidden: int = 32, loc_pre_pool: int = 1, dropout: float = 0.5) -> None:
        super().__init__()
        if family not in STN_FAMILIES:
            raise ValueError(f"family: unknown family {family!r}; valid choices: {', '.join(STN_FAMILIES)}")
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier: unknown classifier {classifier!r}; valid choices: {', '.join(CLASSIFIERS)}")
        self.spec = parse_arch(arch, CLASSIFIERS[classifier], classifier)
        self.family = family
        self.image_size = check_size(image_size, "image_size")
        for value, name in ((loc_channels, "loc_channels"), (loc_hidden, "loc_hidden"), (loc_pre_pool, "loc_pre_pool")):
            check_int(value, name, minimum=1)
        layers, self.head, shapes = classifier_layers(classifier, in_channels, image_size, n_classes, dropout)
        self.layers = nn.ModuleList(layers)
        self.shapes = shapes
        self.transformers = nn.ModuleList()
        for d in self.spec.depths:
            c, h, w = shapes[d]
            loc_head = LocalisationHead(c, (h, w), channels=loc_channels, hidden=loc_hidden,
                                        pre_pool=loc_pre_pool if d == 0 else 1)
            private: list[nn.Module] = []
            if self.spec.kind == "DL" and d > 0:
                private = classifier_layers(classifier, in_channels, image_size, n_classes, dropout)[0][:d]
            self.transformers.append(SpatialTransformer(_Localiser(private, loc_head), family))
        self.config: dict = {}

    # -- parameter groups
    def localisation_parameters(self) -> list[nn.Parameter]:
        return list(self.transformers.parameters())

    def classifier_parameters(self) -> list[nn.Parameter]:
        return list(self.layers.parameters()) + list(self.head.parameters())

    # -- forward
    def features(self, x: torch.Tensor, depth: int, start: int = 0) -> torch.Tensor:
        """Run classifier layers ``start .. depth - 1`` on ``x`` (the map at depth ``start``)."""
        for layer in self.layers[start:depth]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_transforms(x)[0]

    def check_images(self, x: torch.Tensor) -> None:
        """``x`` has the shape the model was built for, ``(B, in_channels, H, W)`` (shape only: cheap).

        >>> build_model("CNN").check_images(torch.rand(2, 1, 32, 32))
        Traceback (most recent call last):
        ...
        ValueError: images: expected shape (B, 1, 28, 28) (the model's in_channels and image_size), got (2, 1, 32, 32)
        """
        want = self.shapes[0]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images: expected a torch.Tensor of shape (B, {want[0]}, {want[1]}, {want[2]}), "
                            f"got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"images: expected shape (B, {want[0]}, {want[1]}, {want[2]}) (the model's in_channels "
                             f"and image_size), got {tuple(x.shape)}")

    def forward_with_transforms(self, x: torch.Tensor) -> tuple[torch.Tensor, Transforms]:
        self.check_images(x)
        kind = self.spec.kind
        if kind == "CNN":
            return self.head(self.features(x, len(self.layers))), Transforms([], None)
        if kind == "C":
            return self._forward_feature_maps(x)
        return self._forward_input(x)

    def forward_with_feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, Transforms, dict]:
        """STN-C forward that also returns the feature maps its transformers act on:
        ``(logits, transforms, {depth: (map entering the transformer, transformed map)})``.

        >>> m = build_model("STN-C1", family="rotation")
        >>> _, _, maps = m.forward_with_feature_maps(torch.rand(2, 1, 28, 28))
        >>> [tuple(t.shape) for t in maps[1]]
        [(2, 64, 14, 14), (2, 64, 14, 14)]
        """
        if self.spec.kind != "C":
            raise ValueError(f"model: {self.spec.name} does not transform feature maps (an STN-C architecture does)")
        self.check_images(x)
        captured: dict = {}
        logits, tr = self._forward_feature_maps(x, capture=captured)
        return logits, tr, captured

    def _forward_feature_maps(self, x: torch.Tensor, capture: dict | None = None) -> tuple[torch.Tensor, Transforms]:
        """STN-C forward; ``capture[depth] = (map before, map after the transformer)`` when given."""
        per_depth = []
        h, reached, i = x, 0, 0
        depths = self.spec.depths
        while i < len(depths):
            d = depths[i]
            h = self.features(h, d, reached)
            reached = d
            base, total = h, None
            while i < len(depths) and depths[i] == d:  # iterate at this depth: compose, resample once
                st = self.transformers[i]
                cur = base if total is None else st.sample(base, total)
                a = st.predict(cur, base.shape[-2:])
                total = a if total is None else a @ total
                i += 1
            h = self.transformers[i - 1].sample(base, total)
            per_depth.append((d, total))
            if capture is not None:
                capture[d] = (base, h)
        logits = self.head(self.features(h, len(self.layers), reached))
        composed = per_depth[0][1]
        for _, m in per_depth[1:]:
            composed = m @ composed
        return logits, Transforms(per_depth, composed)

    def _forward_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Transforms]:
        total, cur = None, x
        size = x.shape[-2:]
        for st, d in zip(self.transformers, self.spec.depths):
            loc_in = self.features(cur, d) if self.spec.kind == "SL" else cur
            a = st.predict(loc_in, size)
            total = a if total is None else a @ total
            cur = st.sample(x, total)  # always the ORIGINAL input, by the composed transformation
        logits = self.head(self.features(cur, len(self.layers)))
        return logits, Transforms([(0, total)], total)


def build_model(arch: str = "CNN", **config) -> STNClassifier:
    """Build an architecture from keyword arguments (the builder named in ``stn`` checkpoints).

    Keyword arguments: ``classifier`` (``mnist`` or ``svhn``), ``in_channels``, ``image_size``,
    ``n_classes``, ``family`` (any family of the geometry core), ``loc_channels``,
    ``loc_hidden``, ``loc_pre_pool`` (max-pool the input before the depth-0 localisation head),
    ``dropout`` (svhn classifier). JSON-friendly: ``image_size`` may be a list.

    >>> build_model("STN-C1", family="rotation").spec
    ArchSpec(kind='C', depths=(1,))
    """
    if "image_size" in config:
        config["image_size"] = check_size(config["image_size"], "image_size")
    model = STNClassifier(arch, **config)
    model.config = {"arch": model.spec.name, **config}
    if "image_size" in config:
        model.config["image_size"] = list(config["image_size"])
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
