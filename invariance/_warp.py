"""Warping a batch of images or feature maps by many candidate transformations at once.

Convention
----------
Every function here takes transformation matrices in the **normalised** frame of
:mod:`invariance.geometry` (``[-1, 1]`` over the field of view, ``align_corners=False``,
``(x, y)`` order) mapping **input to output**: ``warp(f, A)(q) = f(A^{-1} q)``. Convert
centred-frame (pixel) matrices with :func:`invariance.geometry.centred_to_normalized`, or call
:func:`transform_images`, which takes family parameters directly.

Affine matrices go through :func:`torch.nn.functional.affine_grid`; projective ones (last row
not ``(0, 0, 1)``) through a homogeneous grid of their own. Sampling is
:func:`torch.nn.functional.grid_sample`, so everything runs on the device of the inputs and is
differentiable with respect to both the images and the matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import geometry as G
from .checks import check_finite, check_images, check_matrix, check_size

__all__ = [
    "PADDING_MODES",
    "MODES",
    "warp",
    "warp_chunks",
    "sampling_grid",
    "grid_from_inverse",
    "valid_mask",
    "transform_images",
    "disk_mask",
]

PADDING_MODES = ("zeros", "border", "reflection")
MODES = ("bilinear", "nearest", "bicubic")


def _normalise_matrices(matrices: torch.Tensor, batch: int) -> tuple[torch.Tensor, bool]:
    """Return (matrices as (K,3,3) shared or (B,K,3,3) per image, per_image flag)."""
    check_matrix(matrices, "matrices")
    check_finite(matrices, "matrices")
    if matrices.dim() == 2:
        return matrices.unsqueeze(0), False
    if matrices.dim() == 3:
        if matrices.shape[0] == 0:
            raise ValueError("matrices: no transformations given (K = 0)")
        return matrices, False
    if matrices.dim() == 4:
        if matrices.shape[0] != batch:
            raise ValueError(
                f"matrices: per-image matrices need shape (B={batch}, K, 3, 3), got {tuple(matrices.shape)}"
            )
        if matrices.shape[1] == 0:
            raise ValueError("matrices: no transformations given (K = 0)")
        return matrices, True
    raise ValueError(f"matrices: expected (3, 3), (K, 3, 3) or (B, K, 3, 3), got {tuple(matrices.shape)}")


def sampling_grid(matrices: torch.Tensor, size: Sequence[int], *, affine: bool | None = None) -> torch.Tensor:
    """Sampling grids ``(N, H, W, 2)`` for ``grid_sample`` from input->output matrices ``(N, 3, 3)``.

    The grid holds, for each output pixel ``q`` (normalised), the source point ``A^{-1} q``.
    ``affine=None`` picks the fast ``affine_grid`` path when the last rows are ``(0, 0, 1)`` and no
    gradient flows into the matrices (``affine_grid`` ignores the last row, so its derivatives
    would be wrong for projective parameters); ``affine=True`` promises the last row is constant.

    >>> g = sampling_grid(torch.eye(3)[None], (2, 3))
    >>> g[0, 0, 0]            # top-left pixel centre in normalised coordinates
    tensor([-0.6667, -0.5000])
    """
    check_size(size)
    inv = G.inverse(matrices)
    # affine_grid ignores the last row; when gradients flow into the matrices, the homogeneous
    # grid (which divides by the third coordinate) gives the correct derivatives for h31, h32
    if affine is None:
        affine = G.is_affine(matrices) and not matrices.requires_grad
    return grid_from_inverse(inv, size, affine=affine)


def grid_from_inverse(sampling: torch.Tensor, size: Sequence[int], *, affine: bool) -> torch.Tensor:
    """``grid_sample`` grid ``(N, H, W, 2)`` of **output -> input** matrices ``(N, 3, 3)`` (normalised).

    Every output pixel centre ``q`` (:func:`invariance.geometry.pixel_centres`) is mapped to
    ``S q``: by ``affine_grid`` when ``affine`` (the last row is ``(0, 0, 1)``), else with a
    perspective divide whose vanishing denominators are kept ``sqrt(eps)`` away from zero, with
    their sign. No checks and no device synchronisation: the training path's sampler
    (:func:`stn.resample`) calls it every step.

    >>> grid_from_inverse(torch.eye(3)[None], (1, 2), affine=False)[0, 0]
    tensor([[-0.5000,  0.0000],
            [ 0.5000,  0.0000]])
    """
    h, w = check_size(size)
    if affine:
        return F.affine_grid(sampling[:, :2, :], [sampling.shape[0], 1, h, w], align_corners=False)
    ys, xs = G.pixel_centres((h, w), dtype=sampling.dtype, device=sampling.device)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(1, h * w, 3)
    src = pts @ sampling.transpose(-1, -2)
    den = src[..., 2:3]
    eps = torch.finfo(sampling.dtype).eps ** 0.5
    den = torch.where(den.abs() < eps, torch.where(den < 0, -eps, eps) * torch.ones_like(den), den)
    return (src[..., :2] / den).reshape(-1, h, w, 2)


def _sample(images, grid, mode, padding_mode):
    return F.grid_sample(images, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def warp_chunks(
    images: torch.Tensor,
    matrices: torch.Tensor,
    *,
    size: Sequence[int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    chunk_size: int | None = None,
    affine: bool | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(k_slice, warped)`` with ``warped`` of shape ``(B, k, C, H', W')`` chunk by chunk.

    Memory stays bounded by ``chunk_size`` transformations at a time whatever ``K`` is. Shared
    matrices ``(K, 3, 3)`` are applied to every image without copying the images (the batch
    is folded into the channels); per-image matrices ``(B, K, 3, 3)`` warp image ``b`` by
    ``matrices[b]``.

    >>> x = torch.rand(2, 3, 8, 8)
    >>> [w.shape for _, w in warp_chunks(x, torch.eye(3).repeat(5, 1, 1), chunk_size=2)]
    [torch.Size([2, 2, 3, 8, 8]), torch.Size([2, 2, 3, 8, 8]), torch.Size([2, 1, 3, 8, 8])]
    """
    check_images(images)
    if mode not in MODES:
        raise ValueError(f"mode: unknown interpolation {mode!r}; valid choices: {', '.join(MODES)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"padding_mode: unknown padding {padding_mode!r}; valid choices: {', '.join(PADDING_MODES)}"
        )
    b, c, h, w = images.shape
    mats, per_image = _normalise_matrices(matrices, b)
    mats = mats.to(dtype=images.dtype, device=images.device)
    G.check_invertible(mats, "matrices")
    out_size = (h, w) if size is None else check_size(size)
    if chunk_size is None:
        # about 64 M output elements per chunk
        chunk_size = max(1, (64 << 20) // max(1, b * c * out_size[0] * out_size[1]))
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size}")
    if affine is None:
        affine = G.is_affine(mats) and not mats.requires_grad
    yield from unchecked_chunks(images, mats if per_image else mats[None], out_size, chunk_size, affine=affine,
                                mode=mode, padding_mode=padding_mode, shared=not per_image)


def unchecked_chunks(images: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int], chunk_size: int, *,
                     affine: bool, mode: str = "bilinear", padding_mode: str = "zeros",
                     shared: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
    """:func:`warp_chunks` without its checks and without any device synchronisation: the
    search's inner loops (a refinement step, a polish move) call it with matrices built from
    finite parameters. ``matrices`` ``(B, K, 3, 3)`` normalised, invertible (an invertible
    matrix is not checked: a singular one gives non-finite samples, never an error), or
    ``(1, K, 3, 3)`` with ``shared=True`` (every image warped by each, without copying them)."""
    b, c, h, w = images.shape
    ho, wo = size
    src = images.reshape(1, b * c, h, w) if shared else images
    for sl, kk, grid in _tall_grids(matrices, size, chunk_size, affine):
        out = _sample(src, grid, mode, padding_mode)
        yield sl, out.view(b, c, kk, ho, wo).transpose(1, 2)  # (B, k, C, H', W'), a view


def _tall_grids(matrices: torch.Tensor, size: tuple[int, int], chunk_size: int,
                affine: bool) -> Iterator[tuple[slice, int, torch.Tensor]]:
    """Per chunk of ``chunk_size`` of the matrices ``(B or 1, K, 3, 3)``: ``(k_slice, k, grid)`` with the
    chunk's ``k`` grids stacked along the output's rows, ``(B or 1, k H', W', 2)``, so that each
    image is sampled once per chunk as it is (never copied ``k`` times) and its ``k`` warps come out
    as one tall map."""
    ho, wo = size
    k_total = matrices.shape[1]
    for k0 in range(0, k_total, chunk_size):
        sl = slice(k0, min(k_total, k0 + chunk_size))
        m = matrices[:, sl]
        kk = m.shape[1]
        grid = grid_from_inverse(torch.linalg.inv_ex(m.reshape(-1, 3, 3))[0], size, affine=affine)
        yield sl, kk, grid.reshape(m.shape[0], kk * ho, wo, 2)


def unchecked_block_chunks(images: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int], chunk_size: int, *,
                           affine: bool, shared: bool = False) -> Iterator[tuple[slice, Callable]]:
    """:func:`unchecked_chunks` whose chunks warp on demand, a block of channels at a time: yields
    ``(k_slice, sample)`` with ``sample(c0, c1)`` the chunk's warps of channels ``c0 .. c1 - 1``,
    ``(c1 - c0, B, k, H', W')`` (bilinear, zero padding). The grids are built once per chunk, so a
    caller that consumes a block before warping the next never holds all channels' warps (the FFT
    scoring: each block is transformed while it is in the caches).

    >>> x = torch.rand(2, 3, 8, 8)
    >>> (sl, sample), = unchecked_block_chunks(x, torch.eye(3).repeat(1, 4, 1, 1), (8, 8), 4, affine=True, shared=True)
    >>> torch.equal(sample(1, 3), x[:, 1:3, None].expand(-1, -1, 4, -1, -1).transpose(0, 1))
    True
    """
    b, c, h, w = images.shape
    ho, wo = size
    src = images.transpose(0, 1).contiguous()  # (C, B, H, W): a block of channels is contiguous
    for sl, kk, grid in _tall_grids(matrices, size, chunk_size, affine):

        def sample(c0: int, c1: int, grid=grid, kk=kk) -> torch.Tensor:
            if shared:  # every image and channel of the block as channels of one input
                out = _sample(src[c0:c1].reshape(1, (c1 - c0) * b, h, w), grid, "bilinear", "zeros")
                return out.view(c1 - c0, b, kk, ho, wo)
            out = _sample(src[c0:c1].transpose(0, 1), grid, "bilinear", "zeros")  # (B, c', k H', W')
            return out.view(b, c1 - c0, kk, ho, wo).transpose(0, 1)

        yield sl, sample


def warp(
    images: torch.Tensor,
    matrices: torch.Tensor,
    *,
    size: Sequence[int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    chunk_size: int | None = None,
    affine: bool | None = None,
) -> torch.Tensor:
    """Warp ``images (B, C, H, W)`` by normalised input->output ``matrices``.

    Args:
        images: floating-point tensor ``(B, C, H, W)``.
        matrices: ``(3, 3)`` (one transformation), ``(K, 3, 3)`` (the same K for every image)
            or ``(B, K, 3, 3)`` (K per image); normalised frame, input -> output.
        size: output ``(H', W')`` (default: the input size, same field of view).
        mode: ``"bilinear"`` (default), ``"nearest"`` or ``"bicubic"``.
        padding_mode: ``"zeros"`` (default), ``"border"`` or ``"reflection"``.
        chunk_size: transformations warped at a time (bounds the temporary memory).
        affine: see :func:`sampling_grid` (``None``: decide from the matrices).

    Returns:
        ``(B, C, H', W')`` for a single ``(3, 3)`` matrix, else ``(B, K, C, H', W')``.

    >>> x = torch.zeros(1, 1, 4, 4); x[0, 0, 0, 3] = 1          # top-right pixel
    >>> R = G.to_matrix("rotation", torch.tensor([90.0]))      # counter-clockwise
    >>> warp(x, R)[0, 0].nonzero().tolist()                     # -> top-left
    [[0, 0]]
    """
    parts = [w for _, w in warp_chunks(images, matrices, size=size, mode=mode, padding_mode=padding_mode,
                                       chunk_size=chunk_size, affine=affine)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out[:, 0] if matrices.dim() == 2 else out


def valid_mask(matrices: torch.Tensor, size: Sequence[int], *, threshold: float = 0.999) -> torch.Tensor:
    """Boolean mask ``(K, H, W)`` of output pixels whose source lies inside the input field of view.

    A pixel is valid when bilinear sampling of an all-ones image returns at least ``threshold``
    (so pixels that blend with the zero padding are excluded).

    >>> valid_mask(torch.eye(3)[None], (3, 3)).all()
    tensor(True)
    """
    h, w = check_size(size)
    mats = matrices.unsqueeze(0) if matrices.dim() == 2 else matrices
    ones = torch.ones(1, 1, h, w, dtype=mats.dtype, device=mats.device)
    return warp(ones, mats)[0, :, 0] >= threshold


def disk_mask(size: Sequence[int], radius: float = 1.0, *, dtype=None, device=None) -> torch.Tensor:
    """Boolean ``(H, W)`` mask of pixel centres within ``radius`` of the centre, in normalised units.

    ``radius=1`` is the disk inscribed in the field of view (for ``H != W`` an ellipse in pixels,
    a disk in normalised coordinates), which every rotation about the centre maps into itself.

    >>> disk_mask((4, 4)).int()
    tensor([[0, 1, 1, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 1],
            [0, 1, 1, 0]], dtype=torch.int32)
    """
    h, w = check_size(size)
    if not radius > 0:
        raise ValueError(f"radius: must be positive, got {radius}")
    ys, xs = G.pixel_centres((h, w), dtype=dtype, device=device)
    return (ys[:, None] ** 2 + xs[None, :] ** 2) <= radius**2


def transform_images(
    images: torch.Tensor,
    family: str,
    params,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Transform images by family parameters given in their **centred** (pixel) frame.

    ``params`` of shape ``(n,)`` applies one transformation to every image (returns
    ``(B, C, H, W)``); ``(B, n)`` one per image (returns ``(B, C, H, W)``); ``(K, n)`` with
    ``K != B`` every transformation to every image (returns ``(B, K, C, H, W)``).

    >>> x = torch.rand(2, 1, 10, 14)
    >>> transform_images(x, "translation", [3.0, 0.0]).shape
    torch.Size([2, 1, 10, 14])
    """
    check_images(images)
    p = G.as_params(torch.as_tensor(params, dtype=images.dtype, device=images.device)
                     if not isinstance(params, torch.Tensor) else params.to(images), G.get_family(family))
    h, w = images.shape[-2:]
    m = G.centred_to_normalized(G.to_matrix(family, p), (h, w))
    if p.dim() == 1:
        return warp(images, m, mode=mode, padding_mode=padding_mode)
    if p.dim() == 2 and p.shape[0] == images.shape[0]:
        return warp(images, m.unsqueeze(1), mode=mode, padding_mode=padding_mode)[:, 0]
    if p.dim() == 2:
        return warp(images, m, mode=mode, padding_mode=padding_mode)
    raise ValueError(f"params: expected shape (n,), (B, n) or (K, n), got {tuple(p.shape)}")
