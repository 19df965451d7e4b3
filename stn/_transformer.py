"""The spatial transformer module: localisation network -> parameters -> grid -> bilinear sampler.

Convention
----------
A localisation network ends in a linear layer that outputs ``n`` *raw* numbers, ``n`` the number
of parameters of the chosen family of :mod:`invariance.geometry`. The raw numbers are mapped to
the family's parameters in the **centred frame of the map being warped** (pixels of that map,
degrees, counter-clockwise as displayed) by :func:`raw_to_params`, with scales chosen so that a
raw value of 1 is a sizeable transformation:

=================  ===========================================================================
family             raw -> parameters (map of size ``(H, W)``)
=================  ===========================================================================
translation        ``tx = r0 * W / 2``, ``ty = r1 * H / 2`` (raw = normalised units)
rotation           ``angle = degrees(r0)`` (raw = radians)
scale              ``s = exp(r0)``; ``anisotropic_scale``: ``sx, sy = exp(r0), exp(r1)``
rigid / similarity / scale_translation: the same per component
affine / projective  the normalised-frame matrix is ``I + R`` (``R`` the raw numbers in the
                   family's parameter order, last row of ``R`` zero for affine)
=================  ===========================================================================

Raw zeros are the identity in every family, and the final layer is zero-initialised
(weights and bias), so an untrained transformer is the identity.

The predicted transformation is the one **applied** to the map, **input -> output** (the
geometry core's convention: ``warped(q) = x(A^{-1} q)``), returned as a normalised-frame
3x3 matrix ``A`` (``[-1, 1]`` over the field of view, ``align_corners=False``, ``(x, y)``
order). The sampler needs the opposite direction, so it samples at ``A^{-1} q``: through
:func:`invariance.grid_from_inverse` (``affine_grid`` for affine matrices, a homogeneous
grid for projective ones). Everything follows the device and dtype
of the inputs, so the same code runs on CUDA.

Example
-------
>>> import torch
>>> from stn import SpatialTransformer, LocalisationHead
>>> st = SpatialTransformer(LocalisationHead(1, (28, 28)), "rotation")
>>> x = torch.rand(2, 1, 28, 28)
>>> with torch.no_grad():
...     warped, A = st(x)
>>> warped.shape, A.shape
(torch.Size([2, 1, 28, 28]), torch.Size([2, 3, 3]))
>>> st.params(A, (28, 28))                      # zero-initialised: the identity
tensor([[0.],
        [0.]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from invariance import geometry as G
from invariance import grid_from_inverse
from invariance.checks import check_int, check_size

__all__ = [
    "STN_FAMILIES",
    "raw_to_params",
    "raw_to_matrix",
    "resample",
    "LocalisationHead",
    "SpatialTransformer",
]

#: Families a spatial transformer can predict (every family of the geometry core).
STN_FAMILIES: tuple[str, ...] = tuple(G.FAMILIES)

_AFFINE_ORDER = (0, 1, 2, 3, 4, 5)  # a b c d e f -> rows 0, 1 of the matrix



def _check_family(family: str) -> G.Family:
    if family not in G.FAMILIES:
        raise ValueError(f"family: unknown family {family!r}; valid choices: {', '.join(STN_FAMILIES)}")
    return G.FAMILIES[family]


_LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Dtypes the geometry and the sampling promote to float32."""


def raw_to_params(family: str, raw: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Raw localisation outputs ``(B, n)`` -> family parameters in the centred frame of an ``(H, W)`` map.

    See the module docstring for the mapping; raw zeros give the identity parameters.

    >>> raw_to_params("similarity", torch.zeros(1, 4), (28, 28))
    tensor([[0., 1., 0., 0.]])
    >>> raw_to_params("translation", torch.tensor([[0.5, -1.0]]), (20, 28))
    tensor([[  7., -10.]])
    """
    fam = _check_family(family)
    h, w = check_size(size)
    if raw.dim() != 2 or raw.shape[-1] != fam.n_params:
        raise ValueError(f"raw: family {family!r} needs shape (B, {fam.n_params}), got {tuple(raw.shape)}")
    r = raw.unbind(-1)
    name = fam.name
    if name in ("affine", "projective"):
        return G.from_matrix(fam, G.normalized_to_centred(_raw_matrix(fam, raw), (h, w)))
    shift = lambda i: [r[i] * (w / 2.0), r[i + 1] * (h / 2.0)]
    cols = {
        "translation": lambda: shift(0),
        "rotation": lambda: [torch.rad2deg(r[0])],
        "scale": lambda: [torch.exp(r[0])],
        "anisotropic_scale": lambda: [torch.exp(r[0]), torch.exp(r[1])],
        "rigid": lambda: [torch.rad2deg(r[0]), *shift(1)],
        "scale_translation": lambda: [torch.exp(r[0]), *shift(1)],
        "similarity": lambda: [torch.rad2deg(r[0]), torch.exp(r[1]), *shift(2)],
    }[name]()
    return torch.stack(cols, dim=-1)


def _raw_matrix(fam: G.Family, raw: torch.Tensor) -> torch.Tensor:
    """``I + R`` in the normalised frame for the affine and projective families."""
    b = raw.shape[0]
    eye = torch.eye(3, dtype=raw.dtype, device=raw.device).expand(b, 3, 3)
    full = torch.cat([raw, raw.new_zeros(b, 9 - raw.shape[1])], dim=1).reshape(b, 3, 3)
    return eye + full


def raw_to_matrix(family: str, raw: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Raw localisation outputs ``(B, n)`` -> normalised input -> output matrices ``(B, 3, 3)``.

    The matrices act on an ``(H, W)`` map in its normalised frame; the route is
    :func:`raw_to_params` -> :func:`invariance.geometry.to_matrix` (centred frame) ->
    :func:`invariance.geometry.centred_to_normalized`. Differentiable in ``raw``.

    >>> raw_to_matrix("rotation", torch.zeros(1, 1), (28, 28))
    tensor([[[1., 0., 0.],
             [0., 1., 0.],
             [0., 0., 1.]]])
    """
    fam = _check_family(family)
    # The geometry runs in float32 at least, outside autocast: under bfloat16 autocast (the budgeted
    # training on CUDA) the regressor's output is bfloat16, in which linalg.inv does not exist and
    # whose 8-bit mantissa would put a 28-px map's sampling points ~0.1 px off.
    raw = raw.float() if raw.dtype in _LOW_PRECISION else raw
    with torch.autocast(raw.device.type, enabled=False):
        if fam.name in ("affine", "projective"):
            check_size(size)
            return _raw_matrix(fam, raw)
        params = raw_to_params(family, raw, size)
        return G.centred_to_normalized(G.to_matrix(fam, params), size)


def resample(x: torch.Tensor, matrix: torch.Tensor, *, projective: bool | None = None,
             mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Warp ``x (B, C, H, W)`` by normalised input -> output matrices ``(B, 3, 3)`` (same size out).

    ``warped(q) = x(A^{-1} q)``; zeros outside the field of view. ``projective=None`` decides
    from the matrices' last row (which synchronises with the device once); the transformer
    passes it explicitly.

    >>> x = torch.zeros(1, 1, 4, 4); x[0, 0, 0, 3] = 1      # top-right pixel
    >>> A = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([90.0])), (4, 4))
    >>> resample(x, A[None])[0, 0].nonzero().tolist()    # counter-clockwise -> top-left
    [[0, 0]]
    """
    if matrix.dim() != 3 or matrix.shape[1:] != (3, 3) or matrix.shape[0] != x.shape[0]:
        raise ValueError(f"matrix: expected shape (B={x.shape[0]}, 3, 3), got {tuple(matrix.shape)}")
    if projective is None:
        projective = not G.is_affine(matrix)
    # A low-precision map (bfloat16 autocast) is sampled in float32 and returned in its own dtype:
    # the inverse and the grid need float32 (see raw_to_matrix), and grid_sample one dtype for both.
    low = x.dtype in _LOW_PRECISION
    with torch.autocast(x.device.type, enabled=False):
        xs = x.float() if low else x
        sampling = torch.linalg.inv(matrix.to(xs.dtype))
        grid = grid_from_inverse(sampling, x.shape[-2:], affine=not projective)
        out = F.grid_sample(xs, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    return out.to(x.dtype) if low else out


class LocalisationHead(nn.Module):
    """The localisation layers that turn a map into a feature vector (the regressor comes after).

    ``conv 5x5 (channels) -> max-pool 2 -> ReLU`` repeated ``n_conv`` times (``same`` padding,
    ``ceil_mode`` pooling so 1x1 maps survive), then ``FC hidden -> ReLU``. With the defaults
    (two convolutions of 32, FC 32) this is the STN-C0 localisation network of the paper's MNIST
    experiments; on a feature map at depth X it is the "localisation head" of STN-CX, -DLX, -SLX.

    >>> LocalisationHead(64, (14, 14))(torch.rand(3, 64, 14, 14)).shape
    torch.Size([3, 32])
    """

    def __init__(self, in_channels: int, in_size: Sequence[int], *, channels: int = 32, n_conv: int = 2,
                 hidden: int = 32, pre_pool: int = 1) -> None:
        super().__init__()
        in_channels = check_int(in_channels, "in_channels", minimum=1)
        h, w = check_size(in_size, "in_size")
        channels = check_int(channels, "channels", minimum=1)
        hidden = check_int(hidden, "hidden", minimum=1)
        pre_pool = check_int(pre_pool, "pre_pool", minimum=1)
        n_conv = check_int(n_conv, "n_conv", minimum=0)
        layers: list[nn.Module] = []
        if pre_pool > 1:
            layers.append(nn.MaxPool2d(pre_pool, ceil_mode=True))
            h, w = math.ceil(h / pre_pool), math.ceil(w / pre_pool)
        c = in_channels
        for _ in range(n_conv):
            layers += [nn.Conv2d(c, channels, 5, padding=2), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU()]
            c, h, w = channels, math.ceil(h / 2), math.ceil(w / 2)
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialTransformer(nn.Module):
    """Localisation network + zero-initialised regressor + grid generator + bilinear sampler.

    Args:
        localisation: module mapping the localisation input ``(B, ...)`` to features
            ``(B, localisation.out_features)`` (for example a :class:`LocalisationHead`, or a
            copy of classifier layers followed by one).
        family: the family of transformations predicted (see :data:`STN_FAMILIES`).
        mode, padding_mode: passed to :func:`torch.nn.functional.grid_sample`.

    ``predict(loc_input, size)`` returns the applied normalised input -> output matrices
    ``(B, 3, 3)`` for a map of ``size``; ``forward(x, loc_input=None)`` returns
    ``(warped x, matrices)`` (the localisation input defaults to ``x`` itself).
    """

    def __init__(self, localisation: nn.Module, family: str = "affine", *, features: int | None = None,
                 mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        fam = _check_family(family)
        self.family = fam.name
        self.localisation = localisation
        n_in = features if features is not None else getattr(localisation, "out_features", None)
        if n_in is None:
            raise ValueError("features: give the localisation network's output width "
                             "(or an out_features attribute)")
        self.regressor = nn.Linear(check_int(n_in, "features", minimum=1), fam.n_params)
        self.reset_identity()
        self.mode, self.padding_mode = mode, padding_mode

    def reset_identity(self) -> None:
        """Zero the regressor (weights and bias): the transformer becomes the identity."""
        nn.init.zeros_(self.regressor.weight)
        nn.init.zeros_(self.regressor.bias)

    @property
    def projective(self) -> bool:
        return self.family == "projective"

    def raw(self, loc_input: torch.Tensor) -> torch.Tensor:
        return self.regressor(self.localisation(loc_input))

    def predict(self, loc_input: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Applied transformation (normalised, input -> output) for maps of ``size``: ``(B, 3, 3)``."""
        return raw_to_matrix(self.family, self.raw(loc_input), size)

    def params(self, matrix: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Normalised matrices -> this family's parameters in the centred frame of an ``(H, W)`` map."""
        return G.from_matrix(self.family, G.normalized_to_centred(matrix, size))

    def sample(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        return resample(x, matrix, projective=self.projective, mode=self.mode, padding_mode=self.padding_mode)

    def forward(self, x: torch.Tensor, loc_input: torch.Tensor | None = None):
        m = self.predict(x if loc_input is None else loc_input, x.shape[-2:])
        return self.sample(x, m), m
