"""Transformed MNIST / Fashion-MNIST, generated on the fly, a whole batch at once, on the training device.

Protocols (the paper's, Jaderberg et al. 2015 / Finnveden et al. 2020)
------------------------------------------------------------------------
``rotation``
    the 28x28 digit rotated about its centre by an angle drawn uniformly from
    ``[-90, 90]`` degrees (counter-clockwise positive, as displayed); no clutter.
``translation``
    the digit placed at the centre of a 60x60 canvas and shifted by integer offsets drawn
    uniformly from ``-16 .. 16`` pixels per axis, plus 6 clutter patches of 6x6 pixels cut
    from other images of the same split (at random positions inside the central 20x20 box of the
    source image, where the strokes are) and pasted at random positions on the canvas (digit
    and clutter are combined by a pixel-wise maximum); the clutter does not move with the digit.
``scale``
    the digit at the centre of a 112x112 canvas with 6 clutter patches (as above) pasted on the
    canvas, and then the **whole canvas** (digit and clutter) scaled about the centre by
    ``s = 2^U(-1, 2)`` (0.5 to 4): the clutter is scaled with the digit.

All warps go through :func:`invariance.transform_images` (bilinear, zero padding; the
integer shifts of ``translation`` are exact).

Reduced-resolution protocols (``size=`` < the canvas)
    the same protocol rendered at full resolution and then resized to ``size x size`` with an
    antialiased bilinear filter: every length (digit, shifts, clutter) is multiplied by
    ``size / canvas``. Used by the CPU quick mode of the reproduction.

Parameters returned with every sample
    the applied transformation in the family of the protocol (``rotation``: angle in degrees;
    ``translation``: ``(tx, ty)`` in pixels of the returned image; ``scale``: the factor
    ``s``), in the centred frame of the returned image, so
    ``invariance.geometry.to_matrix(protocol.family, params)`` is the applied matrix.

Randomness
    Training transformations (and clutter) are re-drawn every epoch from a generator seeded by
    ``(seed, split, epoch)``; test sets use one fixed draw (``epoch`` ignored). The draws are
    made on the CPU (cheap: a few numbers per image), so the images are identical on every
    device; only the rendering runs on the training device.

Example
-------
>>> import torch
>>> from stn import TransformedDataset, get_protocol
>>> images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
>>> ds = TransformedDataset(images, torch.arange(8), get_protocol("translation"), seed=0)
>>> x, y, p = next(ds.batches(epoch=0, batch_size=4))
>>> x.shape, y.shape, p.shape
(torch.Size([4, 1, 60, 60]), torch.Size([4]), torch.Size([4, 2]))
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from invariance import transform_images
from invariance.datasets import DATASETS, load_split

__all__ = ["PROTOCOLS", "Protocol", "get_protocol", "Draws", "TransformedDataset", "load_transformed",
           "DIGIT_SIZE"]

DIGIT_SIZE = 28
_SPLIT_CODES = {"train": 1, "test": 2}
_CLUTTER_BOX = (4, 24)  # source patches come from rows/columns 4..23 (the central 20x20 box)


@dataclass(frozen=True)
class Protocol:
    """A transformed-data protocol (see the module docstring).

    Attributes:
        name: ``rotation``, ``translation`` or ``scale``.
        canvas: side of the full-resolution canvas (28, 60, 112).
        size: side of the returned images (``canvas`` unless reduced).
        max_angle: rotation range ``[-max_angle, max_angle]`` degrees.
        max_shift: integer shifts ``-max_shift .. max_shift`` (full-resolution pixels).
        log2_scale: ``(lo, hi)``, ``s = 2^U(lo, hi)``.
        clutter: number of clutter patches; ``clutter_size``: their side (full resolution).
    """

    name: str
    canvas: int
    size: int
    max_angle: float = 90.0
    max_shift: int = 16
    log2_scale: tuple[float, float] = (-1.0, 2.0)
    clutter: int = 0
    clutter_size: int = 6

    @property
    def family(self) -> str:
        """The geometry family of the applied transformation (and of the returned parameters)."""
        return self.name

    @property
    def stn_family(self) -> str:
        """The family a transformer predicts on this protocol's data: the applied family, plus a
        translation for ``scale`` (the clutter makes the digit's centre uncertain)."""
        return "scale_translation" if self.name == "scale" else self.family

    @property
    def zoom(self) -> float:
        return self.size / self.canvas

    @property
    def n_params(self) -> int:
        return 2 if self.name == "translation" else 1

    def describe(self) -> str:
        """One line, exact, e.g. for reproduction reports."""
        if self.name == "rotation":
            core = f"{self.canvas}x{self.canvas}, angle U[-{self.max_angle:g}, {self.max_angle:g}] deg"
        elif self.name == "translation":
            core = (f"{self.canvas}x{self.canvas} canvas, integer shifts -{self.max_shift}..{self.max_shift} px "
                    f"per axis, {self.clutter} clutter patches {self.clutter_size}x{self.clutter_size}")
        else:
            core = (f"{self.canvas}x{self.canvas} canvas, scale 2^U({self.log2_scale[0]:g}, {self.log2_scale[1]:g}), "
                    f"{self.clutter} clutter patches {self.clutter_size}x{self.clutter_size} scaled with the digit")
        if self.size != self.canvas:
            core += (f"; rendered at full resolution and resized to {self.size}x{self.size} (antialiased; every "
                     f"length x{self.zoom:.3g}: digit {DIGIT_SIZE * self.zoom:.3g} px")
            if self.name == "translation":
                core += f", shifts up to {self.max_shift * self.zoom:.3g} px"
            core += ")"
        return f"{self.name}: {core}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["log2_scale"] = list(self.log2_scale)
        return d


PROTOCOLS: dict[str, Protocol] = {
    "rotation": Protocol("rotation", 28, 28),
    "translation": Protocol("translation", 60, 60, clutter=6),
    "scale": Protocol("scale", 112, 112, clutter=6),
}


def get_protocol(name: str, size: int | None = None, **overrides) -> Protocol:
    """The named protocol, optionally rendered at ``size x size`` (see the module docstring).

    >>> get_protocol("scale", size=56).zoom
    0.5
    >>> get_protocol("shear")
    Traceback (most recent call last):
    ...
    ValueError: transform: unknown transformation 'shear'; valid choices: rotation, translation, scale
    """
    if name not in PROTOCOLS:
        raise ValueError(f"transform: unknown transformation {name!r}; valid choices: {', '.join(PROTOCOLS)}")
    p = replace(PROTOCOLS[name], **overrides)
    if size is not None:
        if not 4 <= int(size) <= p.canvas:
            raise ValueError(f"size: must be between 4 and the canvas size {p.canvas}, got {size}")
        p = replace(p, size=int(size))
    if p.size > p.canvas:
        raise ValueError(f"size: {p.size} exceeds the canvas {p.canvas}")
    return p


@dataclass
class Draws:
    """One epoch's random choices for every image of a data set (CPU tensors).

    Attributes:
        params: ``(N, n)`` applied parameters at full resolution (angle; shift in canvas pixels;
            scale factor).
        order: ``(N,)`` the order images are visited in (a permutation, or ``arange`` for test).
        clutter_src: ``(N, K)`` index of the image each clutter patch is cut from.
        clutter_from: ``(N, K, 2)`` (row, column) of the patch in its source image.
        clutter_to: ``(N, K, 2)`` (row, column) of the patch on the canvas.
        seed: the generator seed the draws came from.
    """

    params: torch.Tensor
    order: torch.Tensor
    clutter_src: torch.Tensor
    clutter_from: torch.Tensor
    clutter_to: torch.Tensor
    seed: int


def _seed(seed: int, split: str, epoch: int) -> int:
    state = np.random.SeedSequence([int(seed), _SPLIT_CODES[split], int(epoch)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def draw(protocol: Protocol, n: int, seed: int, *, shuffle: bool) -> Draws:
    """Draw every random choice of one epoch for ``n`` images from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    p = protocol
    if p.name == "rotation":
        params = (torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1) * p.max_angle
    elif p.name == "translation":
        params = torch.randint(-p.max_shift, p.max_shift + 1, (n, 2), generator=g).double()
    else:
        lo, hi = p.log2_scale
        params = torch.exp2(lo + (hi - lo) * torch.rand(n, 1, generator=g, dtype=torch.float64))
    k, cs = p.clutter, p.clutter_size
    if k and n < 2:
        raise ValueError("clutter needs at least 2 images to cut patches from")
    src = (torch.arange(n)[:, None] + 1 + torch.randint(0, max(n - 1, 1), (n, k), generator=g)) % max(n, 1)
    frm = torch.randint(_CLUTTER_BOX[0], _CLUTTER_BOX[1] - cs + 1, (n, k, 2), generator=g)
    to = torch.randint(0, p.canvas - cs + 1, (n, k, 2), generator=g)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    return Draws(params.float(), order, src, frm, to, int(seed))


class TransformedDataset:
    """Images of one split with a protocol's transformations, rendered batch-wise on ``device``.

    Args:
        images: ``uint8 (N, 28, 28)`` (or float in ``[0, 1]``).
        labels: ``(N,)`` integer labels.
        protocol: a :class:`Protocol` (see :func:`get_protocol`).
        seed: the data seed; the draws of epoch ``e`` come from ``(seed, split, e)``.
        split: ``"train"`` (re-drawn every epoch, shuffled) or ``"test"`` (one fixed draw, in order).
        device: where the images are kept and rendered.

    ``batches(epoch, batch_size)`` yields ``(images (B, 1, S, S), labels (B,), params (B, n))``;
    ``dataset[i]`` returns one sample of epoch 0.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, protocol: Protocol, *, seed: int = 0,
                 split: str = "train", device: str | torch.device = "cpu", description: str = "") -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split: unknown split {split!r}; valid choices: {', '.join(_SPLIT_CODES)}")
        if images.dim() != 3 or tuple(images.shape[1:]) != (DIGIT_SIZE, DIGIT_SIZE):
            raise ValueError(f"images: expected shape (N, 28, 28), got {tuple(images.shape)}")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"images and labels: need the same non-zero length, got {len(images)} and {len(labels)}")
        self.device = torch.device(device)
        imgs = images.to(self.device)
        self.images = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
        self.labels = labels.to(self.device, torch.long)
        self.protocol = protocol
        self.seed = int(seed)
        self.split = split
        self.description = description
        self._fixed: Draws | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.protocol.size, self.protocol.size)

    def epoch_seed(self, epoch: int) -> int:
        """Seed of the draws of ``epoch`` (test sets: always the seed of epoch 0)."""
        return _seed(self.seed, self.split, 0 if self.split == "test" else epoch)

    def draws(self, epoch: int = 0) -> Draws:
        if self.split == "test":
            if self._fixed is None:
                self._fixed = draw(self.protocol, len(self), self.epoch_seed(0), shuffle=False)
            return self._fixed
        return draw(self.protocol, len(self), self.epoch_seed(epoch), shuffle=True)

    def render(self, index: torch.Tensor, draws: Draws, *, params: torch.Tensor | None = None,
               clutter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Render images ``index`` with ``draws``; returns ``(images (B, 1, S, S), params (B, n))``.

        ``params`` overrides the drawn full-resolution parameters (e.g. the identity, for the
        untransformed originals); ``clutter=False`` leaves the clutter out.
        """
        p = self.protocol
        dev = self.device
        idx = index.to(dev)
        prm = (draws.params[index] if params is None else params).to(dev, torch.float32)
        x = self.images[idx][:, None]
        if p.name == "rotation":
            out = transform_images(x, "rotation", prm)
        else:
            lo = (p.canvas - DIGIT_SIZE) // 2
            x = F.pad(x, (lo, p.canvas - DIGIT_SIZE - lo, lo, p.canvas - DIGIT_SIZE - lo))
            cl = self._clutter(index, draws) if (clutter and p.clutter) else None
            if p.name == "translation":
                out = transform_images(x, "translation", prm)
                out = out if cl is None else torch.maximum(out, cl)
            else:
                out = transform_images(x if cl is None else torch.maximum(x, cl), "scale", prm)
        if p.size != p.canvas:
            out = F.interpolate(out, size=(p.size, p.size), mode="bilinear", align_corners=False, antialias=True)
        if p.name == "translation":
            prm = prm * p.zoom
        return out, prm

    def _clutter(self, index: torch.Tensor, draws: Draws) -> torch.Tensor:
        """``(B, 1, canvas, canvas)`` clutter patches, pasted by a pixel-wise maximum, vectorised."""
        p, dev = self.protocol, self.device
        cs = p.clutter_size
        src = draws.clutter_src[index].to(dev)  # (B, K)
        frm = draws.clutter_from[index].to(dev)  # (B, K, 2)
        to = draws.clutter_to[index].to(dev)
        ar = torch.arange(cs, device=dev)
        rows = (frm[..., 0, None] + ar)[..., :, None]  # (B, K, cs, 1)
        cols = (frm[..., 1, None] + ar)[..., None, :]  # (B, K, 1, cs)
        patches = self.images[src[..., None, None], rows, cols]  # (B, K, cs, cs)
        dst = (to[..., 0, None] + ar)[..., :, None] * p.canvas + (to[..., 1, None] + ar)[..., None, :]
        b = index.shape[0]
        canvas = torch.zeros(b, p.canvas * p.canvas, device=dev, dtype=patches.dtype)
        canvas.scatter_reduce_(1, dst.reshape(b, -1), patches.reshape(b, -1), reduce="amax")
        return canvas.reshape(b, 1, p.canvas, p.canvas)

    def batches(self, epoch: int = 0, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield ``(images, labels, params)`` batches of ``epoch`` (shuffled for training)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be positive, got {batch_size}")
        d = self.draws(epoch)
        for start in range(0, len(self), batch_size):
            index = d.order[start:start + batch_size]
            x, prm = self.render(index, d)
            yield x, self.labels[index.to(self.device)], prm

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        d = self.draws(0)
        x, prm = self.render(torch.tensor([i % len(self)]), d)
        return x[0], self.labels[i], prm[0]


def load_transformed(dataset: str, split: str, protocol: Protocol, *, root: str | os.PathLike | None = None,
                     seed: int = 0, limit: int | None = None, device: str | torch.device = "cpu",
                     split_seed: int = 0) -> TransformedDataset:
    """Load a split with :func:`invariance.datasets.load_split` and wrap it in a :class:`TransformedDataset`.

    ``limit`` keeps the first ``limit`` images (quick runs and tests). The description of the
    returned data set names the split protocol (e.g. ``mnist-10k stratified 8000/2000 (seed 0)``).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset: unknown data set {dataset!r}; valid choices: {', '.join(DATASETS)}")
    s = load_split(dataset, split, root=root, seed=split_seed)
    images, labels = s.images, s.labels
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit: must be positive, got {limit}")
        images, labels = images[:limit], labels[:limit]
    desc = f"{dataset} {split} ({s.protocol}{f', first {len(labels)}' if limit is not None else ''})"
    return TransformedDataset(images, labels, protocol, seed=seed, split=split, device=device, description=desc)
