"""Tests of :mod:`invariance._warp`: exact lattice cases, an independent oracle, convention pinning.

Conventions under test (see the docstrings of :mod:`invariance.geometry` and :mod:`invariance._warp`):
``warp`` takes **normalised**, **input -> output** matrices, ``warp(f, A)(q) = f(A^{-1} q)``,
``align_corners=False``; ``transform_images`` takes family parameters in the **centred** (pixel)
frame; a positive angle is counter-clockwise as displayed (y points down).

Three independent references pin the whole chain:

* exact lattice cases: ``torch.rot90``, ``torch.roll``, ``torch.flip``;
* an oracle that shares no code with the module: :func:`scipy.ndimage.affine_transform` (and
  :func:`scipy.ndimage.geometric_transform` for projective maps), order 1;
* asymmetric inputs (H != W, an off-centre blob, a known direction), each written so that it
  fails if x and y are swapped or if a sign is flipped.

All comparisons are in float64 unless a test is about another dtype. The numeric tests run on
every device of the ``device`` fixture (``conftest.py``): the inputs are built on the CPU as
before and moved with ``.to(device)``, the results are compared on the CPU.
"""

from __future__ import annotations

import math
import pathlib
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from scipy import ndimage

from invariance import _warp as W
from invariance import geometry as G

DT = torch.float64
TOL = dict(atol=1e-10, rtol=0.0)



def T(*values, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=DT, device=device)


def check(actual, expected, **kw):
    """``assert_close`` on the CPU: results computed on another device come back first."""
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **(kw or TOL))


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def smooth(*shape, seed=0) -> torch.Tensor:
    """A smooth random image (a few random low-frequency cosines), float64."""
    *lead, h, w = shape
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
    out = torch.zeros(*shape, dtype=DT)
    for _ in range(4):
        fx, fy, phase = torch.rand(3, generator=g, dtype=DT) * torch.tensor([1.5, 1.5, 2 * math.pi], dtype=DT)
        amp = torch.rand(*lead, 1, 1, generator=g, dtype=DT)
        out = out + amp * torch.cos(2 * math.pi * (fx * xx / w + fy * yy / h) + phase)
    return out


def blob(h, w, row, col, sigma=None) -> torch.Tensor:
    """(1, 1, H, W): a single bright pixel at (row, col), or a Gaussian of width ``sigma`` there."""
    if sigma is None:
        x = torch.zeros(1, 1, h, w, dtype=DT)
        x[0, 0, row, col] = 1.0
        return x
    yy, xx = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
    return torch.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * sigma**2))[None, None]


def argmax2d(img: torch.Tensor) -> tuple[int, int]:
    img = img.reshape(img.shape[-2:]).cpu()
    i = int(img.argmax())
    return divmod(i, img.shape[-1])


def centroid(img: torch.Tensor) -> tuple[float, float]:
    """(row, col) centre of mass of a non-negative image (computed on the CPU)."""
    img = img.reshape(img.shape[-2:]).cpu()
    h, w = img.shape
    rows = torch.arange(h, dtype=img.dtype)[:, None]
    cols = torch.arange(w, dtype=img.dtype)[None, :]
    m = img.sum()
    return float((img * rows).sum() / m), float((img * cols).sum() / m)


def centred(family, *params, size, device="cpu") -> torch.Tensor:
    """A centred-frame (pixel) family transform as the normalised matrix that ``warp`` consumes
    (computed on the CPU, then moved to ``device``)."""
    return G.centred_to_normalized(G.to_matrix(family, T(*params)), size).to(device)


# ----------------------------------------------------------------------------- the oracle


SWAP = np.array([[0.0, 1.0], [1.0, 0.0]])


def pixel_inverse(N: torch.Tensor, size) -> np.ndarray:
    """Output pixel (x, y) -> input pixel (x, y) for the normalised input->output matrix ``N``.

    ``A_pix = F_{n->p} N F_{p->n}`` is the same map in the pixel (index) frame; ``warp`` samples
    the input at ``A_pix^{-1} q`` for output pixel ``q``.
    """
    A_pix = G.frame_matrix(size, frm="normalized", to="pixel", dtype=DT) @ N @ G.frame_matrix(
        size, frm="pixel", to="normalized", dtype=DT)
    return torch.linalg.inv(A_pix).numpy()


def scipy_affine(img: np.ndarray, N: torch.Tensor, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Oracle: :func:`scipy.ndimage.affine_transform` (order 1) for a normalised affine ``N``.

    scipy's convention: ``out[o] = in[Ms @ o + off]`` with ``o = (row, col)`` *indices* (output ->
    input, (row, col) order). Ours: ``N`` maps input -> output in normalised ``(x, y)``. So take
    ``B = A_pix^{-1}`` (output -> input, pixel ``(x, y)``, see :func:`pixel_inverse`) and swap the
    axes with ``S = [[0, 1], [1, 0]]``: ``Ms = S B[:2, :2] S`` and ``off = S B[:2, 2]``.

    Returns the oracle image and the (row, col) source coordinates of every output pixel.
    """
    B = pixel_inverse(N, img.shape)
    Ms, off = SWAP @ B[:2, :2] @ SWAP, SWAP @ B[:2, 2]
    out = ndimage.affine_transform(img, Ms, offset=off, order=1, mode=mode, cval=0.0)
    rr, cc = np.mgrid[0: img.shape[0], 0: img.shape[1]]
    src = np.einsum("ij,jhw->ihw", Ms, np.stack([rr, cc]).astype(float)) + off[:, None, None]
    return out, src


def interior(src: np.ndarray, size, margin=1e-9) -> np.ndarray:
    """Output pixels whose source lies inside the hull of the input pixel centres."""
    h, w = size
    return ((src[0] >= margin) & (src[0] <= h - 1 - margin) & (src[1] >= margin) & (src[1] <= w - 1 - margin))


def bilinear_zero_pad(img: np.ndarray, x: float, y: float) -> float:
    """Direct bilinear interpolation at pixel (x, y) with zeros outside the image (grid_sample's rule)."""
    h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    total = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wgt = (1 - abs(x - xi)) * (1 - abs(y - yi))
            if 0 <= xi < w and 0 <= yi < h:
                total += wgt * img[yi, xi]
    return total


# ----------------------------------------------------------------------------- exact lattice cases


@pytest.mark.parametrize("n", [6, 7])
@pytest.mark.parametrize("k", [-1, 1, 2, 3, 4])
@pytest.mark.parametrize("mode", W.MODES)
def test_rotation_90k_equals_rot90(n, k, mode, device):
    """Square images, even and odd size: rotation(90 k) is torch.rot90(x, k, dims=(-2, -1))."""
    x = rand(2, 3, n, n)
    expected = torch.rot90(x, k, dims=(-2, -1))
    xd = x.to(device)
    check(W.transform_images(xd, "rotation", [90.0 * k], mode=mode), expected, atol=1e-9, rtol=0)
    check(W.warp(xd, centred("rotation", 90.0 * k, size=(n, n), device=device), mode=mode), expected, atol=1e-9,
          rtol=0)


@pytest.mark.parametrize("size", [(7, 11), (6, 10), (11, 5)])
def test_rotation_90_non_square_is_a_lattice_permutation(size, device):
    """H != W of equal parity: the centre maps pixel centres to pixel centres; content outside is 0.

    Output pixel (r, c) reads input pixel (row, col) = (cy + (c - cx), cx - (r - cy)), the inverse
    of the counter-clockwise rotation (x, y) -> (y, -x) in centred coordinates.
    """
    h, w = size
    x = rand(1, 2, h, w)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    expected = torch.zeros_like(x)
    for r in range(h):
        for c in range(w):
            row, col = cy + (c - cx), cx - (r - cy)
            if 0 <= row < h and 0 <= col < w and row == int(row) and col == int(col):
                expected[..., r, c] = x[..., int(row), int(col)]
    check(W.transform_images(x.to(device), "rotation", [90.0]), expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("size", [(5, 8), (6, 9), (7, 4), (1, 6)])
@pytest.mark.parametrize("mode", W.MODES)
def test_rotation_180_non_square_flips_both_axes(size, mode, device):
    x = rand(2, 3, *size)
    xd = x.to(device)
    check(W.transform_images(xd, "rotation", [180.0], mode=mode), torch.flip(x, dims=(-2, -1)), atol=1e-9, rtol=0)
    check(W.transform_images(xd, "rotation", [-180.0], mode=mode), torch.flip(x, dims=(-2, -1)), atol=1e-9, rtol=0)


def shifted_like_roll(x: torch.Tensor, tx: int, ty: int) -> torch.Tensor:
    """torch.roll, with the wrapped-around rows / columns set to 0 (that content comes from outside)."""
    out = torch.roll(x, shifts=(ty, tx), dims=(-2, -1))
    h, w = x.shape[-2:]
    if ty > 0:
        out[..., : min(ty, h), :] = 0
    elif ty < 0:
        out[..., max(h + ty, 0):, :] = 0
    if tx > 0:
        out[..., :, : min(tx, w)] = 0
    elif tx < 0:
        out[..., :, max(w + tx, 0):] = 0
    return out


@given(tx=st.integers(-8, 8), ty=st.integers(-8, 8), size=st.sampled_from([(7, 10), (9, 6), (8, 8)]),
       mode=st.sampled_from(W.MODES))
def test_integer_translation_equals_roll(tx, ty, size, mode, device):
    """translation(tx, ty) with integers: torch.roll(x, (ty, tx)) where not wrapped, zeros elsewhere."""
    x = rand(2, 2, *size, seed=tx * 31 + ty)
    out = W.transform_images(x.to(device), "translation", [float(tx), float(ty)], mode=mode)
    check(out, shifted_like_roll(x, tx, ty), atol=1e-9, rtol=0)


def test_sequential_lattice_warps_compose(device):
    """warp by B then by A equals one warp by compose(A, B) on the lattice (here: 90 + 90 = 180, shifts)."""
    size = (9, 9)
    x = rand(1, 2, *size)
    xd = x.to(device)
    R = centred("rotation", 90.0, size=size, device=device)
    check(W.warp(W.warp(xd, R), R), W.warp(xd, G.compose(R, R)), atol=1e-9, rtol=0)
    check(W.warp(xd, G.compose(R, R)), torch.flip(x, dims=(-2, -1)), atol=1e-9, rtol=0)
    A = centred("translation", 2.0, 0.0, size=size, device=device)
    B = centred("translation", 0.0, -3.0, size=size, device=device)
    check(W.warp(W.warp(xd, B), A), W.warp(xd, G.compose(A, B)), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- the scipy oracle


@st.composite
def affine_centred(draw):
    """Random centred-frame affine maps: anisotropic scale, shear, rotation, then translation."""
    angle = draw(st.floats(-179.0, 179.0))
    sx, sy = draw(st.floats(0.5, 2.0)), draw(st.floats(0.5, 2.0))
    shear = draw(st.floats(-0.5, 0.5))
    tx, ty = draw(st.floats(-4.0, 4.0)), draw(st.floats(-4.0, 4.0))
    return G.compose(
        G.to_matrix("translation", T(tx, ty)),
        G.to_matrix("rotation", T(angle)),
        G.to_matrix("affine", T(1.0, shear, 0.0, 0.0, 1.0, 0.0)),
        G.to_matrix("anisotropic_scale", T(sx, sy)),
    )


@given(A=affine_centred(), size=st.sampled_from([(13, 17), (16, 11)]))
def test_affine_agrees_with_scipy_in_the_interior(A, size, device):
    """Interior of non-square images: scipy's order-1 affine_transform (mode='constant') and warp agree."""
    x = rand(1, 1, *size)
    N = G.centred_to_normalized(A, size)
    out = W.warp(x.to(device), N.to(device))[0, 0].cpu().numpy()
    ref, src = scipy_affine(x[0, 0].numpy(), N, mode="constant")
    inside = interior(src, size)
    assume(inside.sum() >= 10)  # a large shift of a shrunk image can leave almost no interior
    np.testing.assert_allclose(out[inside], ref[inside], atol=1e-9, rtol=0)


@pytest.mark.parametrize("padding_mode,scipy_mode", [("zeros", "grid-constant"), ("border", "nearest"),
                                                     ("reflection", "reflect")])
@given(A=affine_centred())
def test_affine_agrees_with_scipy_everywhere(padding_mode, scipy_mode, A, device):
    """Whole image, every padding mode, against the matching scipy boundary rule."""
    size = (12, 19)
    x = rand(1, 1, *size, seed=1)
    N = G.centred_to_normalized(A, size)
    out = W.warp(x.to(device), N.to(device), padding_mode=padding_mode)[0, 0].cpu().numpy()
    ref, _ = scipy_affine(x[0, 0].numpy(), N, mode=scipy_mode)
    np.testing.assert_allclose(out, ref, atol=1e-9, rtol=0)


def test_scipy_oracle_conversion_on_a_known_case():
    """Sanity check of the oracle's conversion itself: a +2 px column shift is in[row, col - 2]."""
    size = (5, 7)
    N = centred("translation", 2.0, 0.0, size=size)
    B = pixel_inverse(N, size)
    np.testing.assert_allclose(SWAP @ B[:2, :2] @ SWAP, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(SWAP @ B[:2, 2], [0.0, -2.0], atol=1e-12)


# ----------------------------------------------------------------------------- convention pinning

# A non-square image with a pixel-centre centre: (H, W) = (9, 13), centre (row 4, col 6).
H9, W13 = 9, 13
CY, CX = 4, 6


def test_rotation_plus_90_moves_right_of_centre_to_above(device):
    """A pixel 3 columns right of the centre goes to 3 rows *above* it (smaller row index).

    A flipped angle sign sends it below, to (7, 6); applying the matrix to (row, col) instead of
    (x, y) (an x/y swap) also sends it to (7, 6); swapping H and W in the frame moves the centre
    (the non-square image makes that visible).
    """
    x = blob(H9, W13, CY, CX + 3).to(device)
    out = W.transform_images(x, "rotation", [90.0])
    assert argmax2d(out) == (CY - 3, CX)
    check(out, blob(H9, W13, CY - 3, CX), atol=1e-9, rtol=0)


def test_rotation_plus_90_top_right_quadrant_goes_to_top_left(device):
    """Gaussian blob in the top-right quadrant at centred (x, y) = (3, -2) -> (y, -x) = (-2, -3).

    Sign flip: it would go to the bottom-right (2, 3); x/y swap: to the bottom-right as well.
    """
    x = blob(H9, W13, CY - 2, CX + 3, sigma=0.8).to(device)
    r, c = centroid(W.transform_images(x, "rotation", [90.0]))
    assert r < CY and c < CX
    assert abs(r - (CY - 3)) < 0.05 and abs(c - (CX - 2)) < 0.05


def test_rotation_small_positive_angle_moves_right_point_up(device):
    """rotation(+30): a blob right of the centre by 5 px ends at (row, col) = (cy - 5 sin 30, cx + 5 cos 30)."""
    size = (21, 31)
    cy, cx = 10, 15
    x = blob(*size, cy, cx + 5, sigma=1.2).to(device)
    r, c = centroid(W.transform_images(x, "rotation", [30.0]))
    assert abs(r - (cy - 2.5)) < 0.1 and abs(c - (cx + 5 * math.cos(math.radians(30)))) < 0.1


def test_translation_x_moves_to_larger_column(device):
    """translation(+2, 0): same row, column + 2. An x/y swap moves the row; a sign flip moves it left."""
    x = blob(H9, W13, 1, 9).to(device)
    out = W.transform_images(x, "translation", [2.0, 0.0])
    assert argmax2d(out) == (1, 11)
    check(out, blob(H9, W13, 1, 11), atol=1e-9, rtol=0)


def test_translation_y_moves_to_larger_row(device):
    """translation(0, +3): row + 3, same column (rows are y, pointing down). Swap / sign flip both fail."""
    x = blob(H9, W13, 1, 9).to(device)
    out = W.transform_images(x, "translation", [0.0, 3.0])
    assert argmax2d(out) == (4, 9)
    check(out, blob(H9, W13, 4, 9), atol=1e-9, rtol=0)


def test_scale_2_doubles_the_offset_from_the_centre(device):
    """scale(2): a pixel at (dx, dy) = (+2, -1) from the centre goes to (+4, -2), i.e. (row 2, col 10).

    Passing A instead of A^{-1} (a flipped exponent) would halve the offset; a centre taken at
    ((H-1)/2, (W-1)/2) in the wrong axes (x/y swap of the frame) puts the blob elsewhere.
    """
    x = blob(H9, W13, CY - 1, CX + 2).to(device)
    out = W.transform_images(x, "scale", [2.0])
    assert argmax2d(out) == (CY - 2, CX + 4)
    assert abs(float(out[0, 0, CY - 2, CX + 4]) - 1.0) < 1e-9
    # a Gaussian's centroid also moves twice as far from the centre
    g = blob(H9 * 3, W13 * 3, 13 - 2, 19 + 3, sigma=1.0).to(device)
    r, c = centroid(W.transform_images(g, "scale", [2.0]))
    assert abs(r - (13 - 4)) < 0.05 and abs(c - (19 + 6)) < 0.05


def test_anisotropic_scale_acts_on_columns_then_rows(device):
    """anisotropic_scale(sx=2, sy=1) stretches along columns (x) only; (1, 2) along rows (y) only."""
    x = blob(H9, W13, CY - 1, CX + 2).to(device)
    assert argmax2d(W.transform_images(x, "anisotropic_scale", [2.0, 1.0])) == (CY - 1, CX + 4)
    assert argmax2d(W.transform_images(x, "anisotropic_scale", [1.0, 2.0])) == (CY - 2, CX + 2)


def test_similarity_scale_2_matches_scale_family(device):
    x = blob(H9, W13, CY - 1, CX + 2).to(device)
    check(W.transform_images(x, "similarity", [0.0, 2.0, 0.0, 0.0]), W.transform_images(x, "scale", [2.0]),
          atol=1e-9, rtol=0)


def test_similarity_with_unit_scale_matches_rigid(device):
    x = rand(1, 2, H9, W13).to(device)
    check(W.transform_images(x, "similarity", [90.0, 1.0, 2.0, -1.0]),
          W.transform_images(x, "rigid", [90.0, 2.0, -1.0]), atol=1e-9, rtol=0)


def test_warp_takes_input_to_output_normalised_matrices(device):
    """A normalised shift of +4/W in x (two pixels) moves content two columns to the right.

    If warp handed A itself (rather than A^{-1}) to affine_grid the blob would move left; if it
    read the matrix in (row, col) order it would move down.
    """
    x = blob(H9, W13, 2, 5).to(device)
    N = T([1.0, 0.0, 4.0 / W13], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], device=device)
    assert argmax2d(W.warp(x, N)) == (2, 7)
    N = T([1.0, 0.0, 0.0], [0.0, 1.0, 2.0 / H9], [0.0, 0.0, 1.0], device=device)
    assert argmax2d(W.warp(x, N)) == (3, 5)


def test_warp_docstring_example(device):
    x = torch.zeros(1, 1, 4, 4, dtype=DT)
    x[0, 0, 0, 3] = 1  # top-right pixel
    out = W.warp(x.to(device), G.to_matrix("rotation", T(90.0)).to(device))  # square: centred == normalised
    check(out, blob(4, 4, 0, 0), atol=1e-9, rtol=0)


@st.composite
def forward_maps(draw):
    family = draw(st.sampled_from(["rigid", "scale_translation", "affine"]))
    if family == "rigid":
        p = [draw(st.floats(-179, 179)), draw(st.floats(-3, 3)), draw(st.floats(-3, 3))]
    elif family == "scale_translation":
        p = [draw(st.floats(0.7, 1.3)), draw(st.floats(-3, 3)), draw(st.floats(-3, 3))]
    else:
        p = [draw(st.floats(0.8, 1.2)), draw(st.floats(-0.3, 0.3)), draw(st.floats(-3, 3)),
             draw(st.floats(-0.3, 0.3)), draw(st.floats(0.8, 1.2)), draw(st.floats(-3, 3))]
    return family, G.to_matrix(family, T(*p))


@given(fm=forward_maps(), offset=st.tuples(st.integers(-4, 4), st.integers(-4, 4)))
def test_content_at_p_ends_up_at_A_p(fm, offset, device):
    """The matrix is a forward map: a Gaussian blob at centred point p has its centroid at A p."""
    family, A = fm
    size = (31, 41)
    cy, cx = 15, 20
    dx, dy = offset
    x = blob(*size, cy + dy, cx + dx, sigma=1.2).to(device)
    out = W.transform_images(x, family, G.from_matrix(family, A).to(device))
    qx, qy = G.apply_to_points(A, T([float(dx), float(dy)]))[0].tolist()
    r, c = centroid(out)
    assert abs(c - (cx + qx)) < 0.1 and abs(r - (cy + qy)) < 0.1


def test_normalised_frame_commutes_with_pooling(device):
    """One normalised matrix moves a map and its 2x2-pooled version alike (same field of view)."""
    x = rand(1, 3, 8, 12).to(device)
    for N in (centred("rotation", 180.0, size=(8, 12), device=device),
              centred("translation", 2.0, -4.0, size=(8, 12), device=device)):
        check(W.warp(F.avg_pool2d(x, 2), N), F.avg_pool2d(W.warp(x, N), 2), atol=1e-9, rtol=0)


def test_output_size_keeps_the_field_of_view(device):
    """warp to another size samples the same field of view: identity to 2x == bilinear upsampling."""
    x = rand(2, 3, 5, 7)
    out = W.warp(x.to(device), torch.eye(3, dtype=DT, device=device), size=(10, 14), padding_mode="border")
    ref = F.interpolate(x, size=(10, 14), mode="bilinear", align_corners=False)
    check(out, ref, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- projective


def test_projective_with_zero_perspective_equals_affine(device):
    x = rand(2, 2, 11, 14).to(device)
    p = [1.1, 0.2, 1.5, -0.3, 0.9, -2.0]
    affine = W.transform_images(x, "affine", p)
    check(W.transform_images(x, "projective", p + [0.0, 0.0]), affine, atol=0, rtol=0)


def test_homogeneous_path_equals_affine_path(device):
    """Batched with a genuinely projective matrix, an affine one goes through the homogeneous grid;
    so does a rescaled affine matrix (last row (0, 0, 3)). Both agree with the affine_grid path."""
    size = (11, 14)
    x = rand(2, 2, *size).to(device)
    A = centred("affine", 1.1, 0.2, 1.5, -0.3, 0.9, -2.0, size=size, device=device)
    P = centred("projective", 1.0, 0.1, 0.5, 0.0, 1.0, 0.0, 0.02, -0.01, size=size, device=device)
    affine = W.warp(x, A)
    check(W.warp(x, torch.stack([A, P]))[:, 0], affine, atol=1e-12, rtol=0)
    check(W.warp(x, 3.0 * A), affine, atol=1e-12, rtol=0)
    grids = W.sampling_grid(torch.stack([A, P]), size)
    check(grids[0], W.sampling_grid(A[None], size)[0], atol=1e-12, rtol=0)


PROJ = [1.05, 0.1, 0.8, -0.05, 0.95, -0.6, 0.012, -0.009]


def test_projective_sampling_points_and_values_by_direct_computation(device):
    """A few output pixels: the sampling point is the dehomogenised A_pix^{-1} q; the value is the
    bilinear interpolation there, computed here from scratch."""
    size = (11, 14)
    h, w = size
    x = rand(1, 1, *size, seed=3)
    N = centred("projective", *PROJ, size=size)
    assert not G.is_affine(N)
    out = W.warp(x.to(device), N.to(device))[0, 0].cpu()
    grid = W.sampling_grid(N[None].to(device), size)[0].cpu()
    # the same map, written out directly in the centred frame: p = A^{-1} q (dehomogenised)
    A_inv = torch.linalg.inv(G.to_matrix("projective", T(*PROJ)))
    img = x[0, 0].numpy()
    for r, c in [(0, 0), (5, 7), (10, 13), (3, 11), (8, 2)]:
        q = T(c - (w - 1) / 2, r - (h - 1) / 2, 1.0)
        p = A_inv @ q
        px, py = float(p[0] / p[2]) + (w - 1) / 2, float(p[1] / p[2]) + (h - 1) / 2
        check(grid[r, c], T((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), atol=1e-12, rtol=0)
        assert abs(float(out[r, c]) - bilinear_zero_pad(img, px, py)) < 1e-12


def test_projective_agrees_with_scipy_geometric_transform(device):
    """Whole image, zero padding: scipy.ndimage.geometric_transform with the inverse map as oracle."""
    size = (11, 14)
    x = rand(1, 1, *size, seed=4)
    N = centred("projective", *PROJ, size=size)
    B = pixel_inverse(N, size)

    def mapping(o):  # output (row, col) -> input (row, col)
        v = B @ np.array([o[1], o[0], 1.0])
        return v[1] / v[2], v[0] / v[2]

    ref = ndimage.geometric_transform(x[0, 0].numpy(), mapping, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(W.warp(x.to(device), N.to(device))[0, 0].cpu().numpy(), ref, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- batching and shapes


def random_normalised(k, seed=0, size=(9, 12)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(k):
        a, tx, ty = ((torch.rand(3, generator=g, dtype=DT) - 0.5) * T(300.0, 6.0, 6.0)).tolist()
        s = 0.7 + 0.6 * float(torch.rand(1, generator=g, dtype=DT))
        mats.append(G.compose(G.to_matrix("rigid", T(a, tx, ty)), G.to_matrix("scale", T(s))))
    return G.centred_to_normalized(torch.stack(mats), size)


def test_shared_matrices_equal_a_loop(device):
    x = rand(3, 2, 9, 12).to(device)
    mats = random_normalised(5).to(device)
    out = W.warp(x, mats)
    assert out.shape == (3, 5, 2, 9, 12)
    for k in range(5):
        check(out[:, k], W.warp(x, mats[k]), atol=1e-12, rtol=0)
        for b in range(3):
            check(out[b, k], W.warp(x[b: b + 1], mats[k])[0], atol=1e-12, rtol=0)


def test_per_image_matrices_equal_a_loop(device):
    x = rand(3, 2, 9, 12).to(device)
    mats = random_normalised(12).reshape(3, 4, 3, 3).to(device)
    out = W.warp(x, mats)
    assert out.shape == (3, 4, 2, 9, 12)
    for b in range(3):
        for k in range(4):
            check(out[b, k], W.warp(x[b: b + 1], mats[b, k])[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("per_image", [False, True])
def test_chunk_size_does_not_change_the_output(per_image, device):
    x = rand(2, 3, 9, 12).to(device)
    mats = (random_normalised(14).reshape(2, 7, 3, 3) if per_image else random_normalised(7)).to(device)
    ref = W.warp(x, mats, chunk_size=None)
    for cs in (1, 3, 7, 100):
        assert torch.equal(W.warp(x, mats, chunk_size=cs), ref)


def test_warp_chunks_yields_consecutive_slices(device):
    x = rand(2, 3, 8, 8).to(device)
    mats = random_normalised(7, size=(8, 8)).to(device)
    full = W.warp(x, mats)
    parts = list(W.warp_chunks(x, mats, chunk_size=3))
    assert [sl for sl, _ in parts] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert [p.shape for _, p in parts] == [(2, 3, 3, 8, 8), (2, 3, 3, 8, 8), (2, 1, 3, 8, 8)]
    for sl, p in parts:
        assert torch.equal(p, full[:, sl])


def test_warp_output_shapes(device):
    x = rand(2, 3, 6, 9).to(device)
    eye = torch.eye(3, dtype=DT, device=device)
    assert W.warp(x, eye).shape == (2, 3, 6, 9)
    assert W.warp(x, eye[None]).shape == (2, 1, 3, 6, 9)
    assert W.warp(x, eye.expand(4, 3, 3)).shape == (2, 4, 3, 6, 9)
    assert W.warp(x, eye.expand(2, 5, 3, 3)).shape == (2, 5, 3, 6, 9)
    assert W.warp(x, eye, size=(4, 5)).shape == (2, 3, 4, 5)
    assert W.warp(x, eye.expand(4, 3, 3), size=(12, 18)).shape == (2, 4, 3, 12, 18)
    # identity is exact
    check(W.warp(x, eye), x, atol=1e-12, rtol=0)
    check(W.warp(x, eye[None])[:, 0], x, atol=1e-12, rtol=0)


def test_transform_images_shape_rules(device):
    x = rand(3, 2, 7, 10).to(device)
    assert W.transform_images(x, "rotation", [30.0]).shape == (3, 2, 7, 10)  # (n,): one for all
    assert W.transform_images(x, "rotation", T(30.0, device=device)).shape == (3, 2, 7, 10)
    per = T([10.0], [20.0], [30.0], device=device)  # (B, n): one per image
    out = W.transform_images(x, "rotation", per)
    assert out.shape == (3, 2, 7, 10)
    for b in range(3):
        check(out[b], W.transform_images(x[b: b + 1], "rotation", per[b])[0], atol=1e-12, rtol=0)
    many = T([10.0], [20.0], [30.0], [40.0], [50.0], device=device)  # (K, n), K != B: every one to every image
    out = W.transform_images(x, "rotation", many)
    assert out.shape == (3, 5, 2, 7, 10)
    for k in range(5):
        check(out[:, k], W.transform_images(x, "rotation", many[k]), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="params"):
        W.transform_images(x, "rotation", torch.zeros(2, 2, 1, dtype=DT))


def test_sampling_grid_identity(device):
    g = W.sampling_grid(torch.eye(3, dtype=DT, device=device)[None], (2, 3))
    assert g.shape == (1, 2, 3, 2)
    # (x, y) order: x varies along columns (W = 3), y along rows (H = 2)
    check(g[0, 0, :, 0], T(-2 / 3, 0.0, 2 / 3), atol=1e-12, rtol=0)
    check(g[0, :, 0, 1], T(-0.5, 0.5), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("size", [(8, 8), (7, 12), (12, 5)])
def test_valid_mask_identity_and_zero_shift(size, device):
    m = W.valid_mask(torch.eye(3, dtype=DT, device=device), size)
    assert m.shape == (1, *size) and m.dtype == torch.bool and bool(m.all())
    assert bool(W.valid_mask(centred("translation", 0.0, 0.0, size=size, device=device)[None], size).all())


@pytest.mark.parametrize("size", [(32, 32), (16, 24)])
def test_valid_mask_scale_half_is_a_quarter(size, device):
    m = W.valid_mask(centred("scale", 0.5, size=size, device=device), size)[0].cpu()
    h, w = size
    assert int(m.sum()) == (h // 2) * (w // 2)  # exactly a quarter for even sizes
    assert abs(float(m.double().mean()) - 0.25) < 1e-12
    # and it is the central block
    assert bool(m[h // 4: 3 * h // 4, w // 4: 3 * w // 4].all())


def test_valid_mask_integer_shift_vacates_columns_and_rows(device):
    size = (7, 10)
    mats = torch.stack([centred("translation", 3.0, 0.0, size=size), centred("translation", 0.0, -2.0, size=size)])
    m = W.valid_mask(mats.to(device), size).cpu()
    assert m.shape == (2, 7, 10)
    assert not m[0, :, :3].any() and bool(m[0, :, 3:].all())  # +3 in x: the 3 left columns are vacated
    assert not m[1, -2:, :].any() and bool(m[1, :-2, :].all())  # -2 in y: the 2 bottom rows are vacated


def test_valid_mask_agrees_with_warped_content(device):
    """Where the mask is True, warping an all-ones image gives 1; elsewhere the output lost mass."""
    size = (10, 13)
    mats = random_normalised(4, size=size).to(device)
    m = W.valid_mask(mats, size).cpu()
    ones = W.warp(torch.ones(1, 1, *size, dtype=DT, device=device), mats)[0, :, 0].cpu()
    assert bool((ones[m] > 0.999).all()) and bool((ones[~m] < 0.999).all())


@pytest.mark.parametrize("size", [(4, 4), (9, 16), (16, 9), (10, 7)])
@pytest.mark.parametrize("radius", [1.0, 0.5, 0.8])
def test_disk_mask_symmetric_and_sized(size, radius, device):
    m = W.disk_mask(size, radius, device=device)
    assert m.device.type == device.type
    m = m.cpu()
    h, w = size
    assert m.shape == size and m.dtype == torch.bool
    assert torch.equal(m, m.flip(0)) and torch.equal(m, m.flip(1))
    assert torch.equal(W.disk_mask((w, h), radius, device=device).cpu(), m.T)  # (H, W) <-> (W, H) transposes
    # an ellipse in pixels: about pi r^2 / 4 of the field of view
    if min(size) >= 9:
        assert abs(float(m.double().mean()) - math.pi * radius**2 / 4) < 0.08
    # the middle row and middle column reach to the normalised radius
    xs = (torch.arange(w, dtype=DT) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=DT) * 2 + 1) / h - 1
    assert int(m[h // 2].sum()) == int((xs**2 + ys[h // 2] ** 2 <= radius**2).sum())
    assert int(m[:, w // 2].sum()) == int((ys**2 + xs[w // 2] ** 2 <= radius**2).sum())


def test_disk_mask_known_answers(device):
    assert W.disk_mask((4, 4), device=device).int().tolist() == [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1],
                                                                 [0, 1, 1, 0]]
    # for H != W it spans the full width in the middle rows and the full height in the middle columns
    m = W.disk_mask((8, 16), device=device).cpu()
    assert bool(m[3].all()) and bool(m[4].all()) and bool(m[:, 7].all()) and bool(m[:, 8].all())
    assert not m[0, 0] and not m[0, 15] and not m[7, 0] and not m[7, 15]
    assert bool(W.disk_mask((2, 4), device=device).all())
    # rotations about the centre keep the unit disk inside the valid region (square image)
    size = (21, 21)
    d = W.disk_mask(size, 0.9, device=device)
    v = W.valid_mask(centred("rotation", 37.0, size=size, device=device), size)[0]
    assert bool(v[d].all())


# ----------------------------------------------------------------------------- gradients


GRAD_PARAMS = {
    "rotation": [17.3],
    "similarity": [17.3, 1.13, 0.37, -0.21],
    "affine": [1.07, 0.13, 0.37, -0.09, 0.93, -0.21],
    "projective": [1.07, 0.13, 0.37, -0.09, 0.93, -0.21, 0.011, -0.007],
}


@pytest.mark.parametrize("family", sorted(GRAD_PARAMS))
def test_gradcheck_wrt_parameters(family, device):
    x = smooth(1, 1, 8, 10, seed=5).to(device)
    p = T(*GRAD_PARAMS[family], device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: W.transform_images(x, family, q), (p,))


@pytest.mark.parametrize("family", ["rotation", "projective"])
def test_gradcheck_wrt_image(family, device):
    x = smooth(1, 2, 8, 10, seed=6).to(device).requires_grad_()
    p = T(*GRAD_PARAMS[family], device=device)
    assert torch.autograd.gradcheck(lambda img: W.transform_images(img, family, p), (x,))


def test_gradcheck_wrt_affine_entries_of_normalised_matrices(device):
    """Per-image (B, K, 3, 3) matrices; the derivative w.r.t. the top two rows (the affine part)."""
    x = smooth(2, 1, 8, 10, seed=7).to(device)
    mats = random_normalised(2, size=(8, 10)).reshape(2, 1, 3, 3).to(device)
    top, last = mats[..., :2, :].clone().requires_grad_(), mats[..., 2:, :]
    assert torch.autograd.gradcheck(lambda t: W.warp(x, torch.cat([t, last], dim=-2)), (top,), fast_mode=True)


def test_gradcheck_wrt_full_projective_matrix(device):
    """Away from the affine case every entry (perspective row included) has the right derivative."""
    x = smooth(1, 1, 8, 10, seed=8).to(device)
    N = centred("projective", *GRAD_PARAMS["projective"], size=(8, 10), device=device).clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda m: W.warp(x, m), (N,), fast_mode=True)




def test_gradcheck_projective_parameters_at_zero_perspective(device):
    x = smooth(1, 1, 8, 10, seed=5).to(device)
    p = T(*GRAD_PARAMS["projective"][:6], 0.0, 0.0, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: W.transform_images(x, "projective", q), (p,), fast_mode=True)


def test_gradcheck_wrt_full_affine_matrix(device):
    x = smooth(1, 1, 8, 10, seed=8).to(device)
    N = centred("affine", *GRAD_PARAMS["affine"], size=(8, 10), device=device).clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda m: W.warp(x, m), (N,), fast_mode=True)


# ----------------------------------------------------------------------------- dtype and device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_follow_input_dtype(dtype, device):
    """Outputs take the images' dtype and device; CPU matrices and parameters are cast and moved to them."""
    x = rand(2, 3, 7, 9).to(dtype).to(device)
    outs = [
        W.warp(x, torch.eye(3, dtype=torch.float64)),  # matrices are cast to the images
        W.warp(x, torch.eye(3, dtype=torch.float32)[None]),
        W.transform_images(x, "rigid", [10.0, 1.0, 2.0]),
        W.transform_images(x, "rigid", torch.tensor([10.0, 1.0, 2.0], dtype=torch.float64)),
        W.sampling_grid(torch.eye(3, dtype=dtype, device=device)[None], (3, 4)),
    ]
    for out in outs:
        assert out.dtype == dtype and out.device.type == device.type
    masks = [W.disk_mask((3, 4), dtype=dtype, device=device), W.valid_mask(torch.eye(3, dtype=dtype, device=device),
                                                                           (3, 4))]
    for m in masks:
        assert m.dtype == torch.bool and m.device.type == device.type


def test_float32_agrees_with_float64(device):
    x = rand(2, 3, 9, 12).to(device)
    p = [23.0, 1.5, -0.7]
    out64 = W.transform_images(x, "rigid", p)
    out32 = W.transform_images(x.float(), "rigid", p)
    check(out32.double(), out64, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available")
def test_cuda_matches_cpu():
    x = rand(2, 3, 9, 12)
    mats = random_normalised(3)
    out = W.warp(x.cuda(), mats.cuda())
    assert out.device.type == "cuda"
    check(out.cpu(), W.warp(x, mats), atol=1e-9, rtol=0)
    out = W.transform_images(x.cuda(), "rotation", [33.0])
    assert out.device.type == "cuda"
    check(out.cpu(), W.transform_images(x, "rotation", [33.0]), atol=1e-9, rtol=0)


def test_no_hard_coded_cuda_in_source():
    """Design rule: device follows the inputs; nothing in geometry or warp names a cuda device."""
    root = pathlib.Path(G.__file__).parent
    for name in ("geometry.py", "_warp.py"):
        src = (root / name).read_text()
        assert not re.search(r"""\.cuda\(|device\s*=\s*["']cuda""", src), name


# ----------------------------------------------------------------------------- bad inputs


IMG = rand(1, 1, 5, 6)
EYE = torch.eye(3, dtype=DT)


@pytest.mark.parametrize("images", [rand(5, 6), rand(1, 5, 6), rand(1, 1, 1, 5, 6)])
def test_wrong_rank_images(images):
    with pytest.raises(ValueError, match=r"images.*\(B, C, H, W\)"):
        W.warp(images, EYE)
    with pytest.raises(ValueError, match="images"):
        W.transform_images(images, "rotation", [10.0])


def test_integer_and_non_tensor_images():
    with pytest.raises(TypeError, match="images.*floating"):
        W.warp(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), EYE)
    with pytest.raises(TypeError, match="images.*floating"):
        W.transform_images(torch.zeros(1, 1, 4, 4, dtype=torch.int64), "rotation", [10.0])
    with pytest.raises(TypeError, match="images"):
        W.warp(np.zeros((1, 1, 4, 4)), EYE)


def test_empty_batch_and_empty_dimensions():
    with pytest.raises(ValueError, match="images.*empty batch"):
        W.warp(torch.zeros(0, 1, 4, 4, dtype=DT), EYE)
    with pytest.raises(ValueError, match="images.*empty"):
        W.warp(torch.zeros(1, 0, 4, 4, dtype=DT), EYE)
    with pytest.raises(ValueError, match="images.*empty"):
        W.transform_images(torch.zeros(1, 1, 0, 4, dtype=DT), "rotation", [1.0])


def test_bad_parameters():
    with pytest.raises(ValueError, match="params.*NaN"):
        W.transform_images(IMG, "rotation", [float("nan")])
    with pytest.raises(ValueError, match="params.*NaN"):
        W.transform_images(IMG, "translation", T(1.0, float("inf")))
    with pytest.raises(ValueError, match=r"params.*2 parameters \(tx, ty\)"):
        W.transform_images(IMG, "translation", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="params.*> 0"):
        W.transform_images(IMG, "scale", [-1.0])


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ValueError, match="family") as info:
        W.transform_images(IMG, "homography", [1.0])
    for name in G.FAMILIES:
        assert name in str(info.value)


def test_bad_matrices():
    with pytest.raises(ValueError, match="matrices.*NaN"):
        W.warp(IMG, torch.full((3, 3), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match=r"matrices.*\(\.\.\., 3, 3\)"):
        W.warp(IMG, torch.eye(2, dtype=DT))
    with pytest.raises(ValueError, match="matrices"):
        W.warp(IMG, EYE.expand(1, 1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"matrices.*B=2"):
        W.warp(rand(2, 1, 4, 4), EYE.expand(3, 2, 3, 3))
    with pytest.raises(ValueError, match="matrices.*K = 0"):
        W.warp(IMG, torch.zeros(0, 3, 3, dtype=DT))
    with pytest.raises(TypeError, match="matrices.*floating"):
        W.warp(IMG, torch.eye(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="matrices.*singular"):
        W.warp(IMG, torch.zeros(3, 3, dtype=DT))


def test_unknown_interpolation_and_padding_list_valid_ones():
    with pytest.raises(ValueError, match="mode.*bilinear, nearest, bicubic"):
        W.warp(IMG, EYE, mode="linear")
    with pytest.raises(ValueError, match="padding_mode.*zeros, border, reflection"):
        W.warp(IMG, EYE, padding_mode="constant")
    with pytest.raises(ValueError, match="mode"):
        W.transform_images(IMG, "rotation", [1.0], mode="area")
    with pytest.raises(ValueError, match="padding_mode"):
        W.transform_images(IMG, "rotation", [1.0], padding_mode="wrap")


@pytest.mark.parametrize("size", [(0, 4), (4, -2), (4,), (1, 2, 3), "ab"])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        W.warp(IMG, EYE, size=size)
    with pytest.raises(ValueError, match="size"):
        W.valid_mask(EYE, size)
    with pytest.raises(ValueError, match="size"):
        W.disk_mask(size)
    with pytest.raises(ValueError, match="size"):
        W.sampling_grid(EYE[None], size)


def test_bad_chunk_size_and_radius():
    with pytest.raises(ValueError, match="chunk_size"):
        W.warp(IMG, EYE, chunk_size=0)
    for r in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="radius"):
            W.disk_mask((4, 4), r)


@pytest.mark.parametrize("shared", [True, False])
def test_block_chunks_warp_each_block_of_channels_as_the_whole_warp_does(shared):
    """``unchecked_block_chunks`` (the FFT scoring's warps, a block of channels at a time) must give,
    for every chunk and every block of channels, exactly the values of ``unchecked_chunks`` (the
    same grids, the same bilinear samples; only the layout differs): shared candidates and one set
    per image, a chunk size that does not divide K, blocks that do not divide C."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 9, 11, generator=g, dtype=torch.float64)
    k = 7
    params = torch.stack([torch.linspace(-170, 170, k), torch.linspace(-2, 2, k), torch.linspace(1, -1, k)], 1)
    mats = G.centred_to_normalized(G.to_matrix("rigid", params.double()), (9, 11))  # (K, 3, 3)
    if shared:
        mats = mats[None]
    else:
        mats = torch.stack([mats, mats.flip(0), mats.roll(2, 0)])  # (B, K, 3, 3)
    whole = list(W.unchecked_chunks(x, mats, (13, 15), 3, affine=True, shared=shared))
    blocks = list(W.unchecked_block_chunks(x, mats, (13, 15), 3, affine=True, shared=shared))
    assert [sl for sl, _ in blocks] == [sl for sl, _ in whole]
    for (_, out), (_, sample) in zip(whole, blocks):
        for c0, c1 in [(0, 2), (2, 4), (4, 5)]:
            torch.testing.assert_close(sample(c0, c1), out[:, :, c0:c1].permute(2, 0, 1, 3, 4), atol=0, rtol=0)
