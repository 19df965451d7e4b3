"""Tests of :mod:`invariance.geometry`, the one home of the geometric conventions.

What is pinned here (conventions from the module docstring):

* matrices act on homogeneous ``(x, y, 1)`` column vectors, x = column (right), y = row (down);
* a matrix maps **input to output**; ``compose(A, B)`` applies ``B`` first;
* a positive rotation angle is counter-clockwise *as displayed*: the point to the right of the
  centre goes *up* (to negative y, because y points down);
* three frames: pixel (centres at integers), centred (pixel units, origin at the image centre)
  and normalised (``[-1, 1]`` over the field of view, ``align_corners=False``).

Every comparison is done in float64. Property tests use hypothesis (profiles are registered in
``conftest.py``); the ranges of the strategies are: angles in (-179, 179) degrees, scales in
[0.25, 4], translations in [-20, 20] pixels, affine maps with ``|det| >= 1/16`` and projective
maps with ``|h31|, |h32| <= 0.01`` (and a determinant bounded away from 0).

The tests of tensor computations run on every device of the ``device`` fixture (``conftest.py``):
parameters and matrices are built on the CPU as before (or drawn by hypothesis there) and moved with
``.to(device)``; results are compared on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from invariance import geometry as G

DT = torch.float64
FAMILY_NAMES = sorted(G.FAMILIES)


def T(*values, device="cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=DT, device=device)


def M(family: str, *params, device="cpu") -> torch.Tensor:
    return G.to_matrix(family, T(*params, device=device))


def check(actual, expected, atol=1e-9, rtol=1e-9):
    """``assert_close`` on the CPU: results computed on another device come back first."""
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=rtol)


EYE = torch.eye(3, dtype=DT)



def families() -> list:
    """FAMILY_NAMES for parametrize."""
    return list(FAMILY_NAMES)

# ----------------------------------------------------------------------------- strategies

angles = st.floats(-179.0, 179.0, allow_nan=False)
scales = st.floats(0.25, 4.0, allow_nan=False)
shifts = st.floats(-20.0, 20.0, allow_nan=False)
perspective = st.floats(-0.01, 0.01, allow_nan=False)


@st.composite
def linear_block(draw):
    """A 2x2 block R(angle) @ diag(±sx, sy) @ shear(k): |det| = sx * sy >= 1/16, never singular."""
    a = math.radians(draw(angles))
    sx, sy = draw(scales), draw(scales)
    sign = draw(st.sampled_from([1.0, -1.0]))
    k = draw(st.floats(-1.0, 1.0))
    rot = torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]], dtype=DT)
    lin = rot @ torch.tensor([[sign * sx, 0.0], [0.0, sy]], dtype=DT) @ torch.tensor([[1.0, k], [0.0, 1.0]], dtype=DT)
    return lin


@st.composite
def family_params(draw, family: str) -> torch.Tensor:
    """Parameters of ``family`` in sensible ranges (float64)."""
    if family == "translation":
        v = [draw(shifts), draw(shifts)]
    elif family == "rotation":
        v = [draw(angles)]
    elif family == "scale":
        v = [draw(scales)]
    elif family == "anisotropic_scale":
        v = [draw(scales), draw(scales)]
    elif family == "rigid":
        v = [draw(angles), draw(shifts), draw(shifts)]
    elif family == "scale_translation":
        v = [draw(scales), draw(shifts), draw(shifts)]
    elif family == "similarity":
        v = [draw(angles), draw(scales), draw(shifts), draw(shifts)]
    elif family in ("affine", "projective"):
        lin = draw(linear_block())
        tx, ty = draw(shifts), draw(shifts)
        v = [float(lin[0, 0]), float(lin[0, 1]), tx, float(lin[1, 0]), float(lin[1, 1]), ty]
        if family == "projective":
            h31, h32 = draw(perspective), draw(perspective)
            # det [[L, t], [h, 1]] = det(L) * (1 - h^T L^-1 t): keep the second factor away from 0
            corr = float(torch.tensor([h31, h32], dtype=DT) @ torch.linalg.solve(lin, T(tx, ty)))
            assume(abs(1.0 - corr) > 0.25)
            v += [h31, h32]
    else:  # pragma: no cover - keep in sync with FAMILIES
        raise AssertionError(family)
    return torch.tensor(v, dtype=DT)


@st.composite
def any_matrix(draw) -> torch.Tensor:
    family = draw(st.sampled_from(FAMILY_NAMES))
    return G.to_matrix(family, draw(family_params(family)))


sizes = st.tuples(st.integers(1, 64), st.integers(1, 64))


# ----------------------------------------------------------------------------- the family table


def test_family_table_matches_documentation():
    expected = {
        "translation": ("tx", "ty"),
        "rotation": ("angle",),
        "scale": ("s",),
        "anisotropic_scale": ("sx", "sy"),
        "rigid": ("angle", "tx", "ty"),
        "scale_translation": ("s", "tx", "ty"),
        "similarity": ("angle", "s", "tx", "ty"),
        "affine": ("a", "b", "c", "d", "e", "f"),
        "projective": ("h11", "h12", "h13", "h21", "h22", "h23", "h31", "h32"),
    }
    assert {name: f.param_names for name, f in G.FAMILIES.items()} == expected
    for name, fam in G.FAMILIES.items():
        assert fam.name == name
        assert fam.n_params == len(fam.identity) == len(fam.param_names)
        # translation_params point at tx, ty (or c, f / h13, h23)
        if fam.translation_params:
            i, j = fam.translation_params
            p = G.identity_params(name, dtype=DT).clone()
            p[i], p[j] = 3.0, -2.0
            check(G.to_matrix(name, p)[:2, 2], T(3.0, -2.0))


def test_get_family():
    assert G.get_family("rotation") is G.FAMILIES["rotation"]
    fam = G.FAMILIES["affine"]
    assert G.get_family(fam) is fam
    assert G.to_matrix(fam, G.identity_params(fam, dtype=DT)).shape == (3, 3)


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_identity_params_give_identity_matrix(family, device):
    p = G.identity_params(family, dtype=DT, device=device)
    assert p.dtype == DT and p.shape == (G.FAMILIES[family].n_params,) and p.device.type == device.type
    assert torch.equal(G.to_matrix(family, p).cpu(), EYE)
    # and back again
    check(G.from_matrix(family, EYE.to(device)), p)


def test_identity_params_dtype_device_default(device):
    assert G.identity_params("rotation").dtype == torch.get_default_dtype()
    assert G.identity_params("rotation", dtype=torch.float32).dtype == torch.float32
    assert G.identity_params("rotation", device="cpu").device.type == "cpu"
    assert G.identity_params("rotation", device=device).device.type == device.type
    check(G.identity_params("similarity", dtype=DT), T(0.0, 1.0, 0.0, 0.0))


def test_identity_matrix_shapes(device):
    assert torch.equal(G.identity_matrix(dtype=DT, device=device).cpu(), EYE)
    i = G.identity_matrix(2, 5, dtype=DT, device=device)
    assert i.shape == (2, 5, 3, 3) and i.device.type == device.type and torch.equal(i.cpu(), EYE.expand(2, 5, 3, 3))
    i[0, 0, 0, 0] = 7.0  # a real copy, not an expanded view
    assert i[1, 1, 0, 0] == 1.0
    assert G.identity_matrix(4, dtype=torch.float32, device=device).dtype == torch.float32


# ----------------------------------------------------------------------------- group laws, every family


@pytest.mark.parametrize("family", FAMILY_NAMES)
@given(data=st.data())
def test_inverse_law(family, data, device):
    A = G.to_matrix(family, data.draw(family_params(family)).to(device))
    Ai = G.inverse(A)
    check(G.compose(A, Ai), EYE, atol=1e-9, rtol=0)
    check(G.compose(Ai, A), EYE, atol=1e-9, rtol=0)
    check(G.inverse(Ai), A, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@given(data=st.data())
def test_identity_law(family, data, device):
    A = G.to_matrix(family, data.draw(family_params(family)).to(device))
    eye = EYE.to(device)
    assert torch.equal(G.compose(eye, A), A)
    assert torch.equal(G.compose(A, eye), A)
    assert torch.equal(G.compose(A), A)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@given(data=st.data())
def test_compose_associative(family, data, device):
    A, B, C = (G.to_matrix(family, data.draw(family_params(family)).to(device)) for _ in range(3))
    left = G.compose(G.compose(A, B), C)
    right = G.compose(A, G.compose(B, C))
    check(left, right, atol=1e-9, rtol=1e-9)
    check(G.compose(A, B, C), left, atol=1e-9, rtol=1e-9)


@given(A=any_matrix(), B=any_matrix(), C=any_matrix())
def test_compose_associative_across_families(A, B, C, device):
    A, B, C = A.to(device), B.to(device), C.to(device)
    check(G.compose(G.compose(A, B), C), G.compose(A, G.compose(B, C)), atol=1e-9, rtol=1e-9)
    # inverse of a product reverses the order
    check(G.inverse(G.compose(A, B)), G.compose(G.inverse(B), G.inverse(A)), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@given(data=st.data())
def test_family_closed_under_compose_and_inverse(family, data, device):
    """Each family is a group: products and inverses stay in it (from_matrix/to_matrix reproduces them)."""
    A = G.to_matrix(family, data.draw(family_params(family)).to(device))
    B = G.to_matrix(family, data.draw(family_params(family)).to(device))
    for m in (G.compose(A, B), G.inverse(A)):
        m = m / m[2, 2]
        check(G.to_matrix(family, G.from_matrix(family, m)), m, atol=1e-8, rtol=1e-8)


# ----------------------------------------------------------------------------- params <-> matrix


@pytest.mark.parametrize("family", families())
@given(data=st.data())
def test_params_matrix_round_trip(family, data, device):
    p = data.draw(family_params(family)).to(device)
    A = G.to_matrix(family, p)
    assert A.shape == (3, 3) and A.dtype == DT and A.device.type == device.type
    if family != "projective":
        assert torch.equal(A[2].cpu(), T(0.0, 0.0, 1.0))  # the affine families give affine matrices
        assert G.is_affine(A)
    check(G.from_matrix(family, A), p, atol=1e-9, rtol=1e-9)
    check(G.to_matrix(family, G.from_matrix(family, A)), A, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@given(data=st.data())
def test_params_matrix_batched(family, data, device):
    """Batch dimensions of params carry through to (..., 3, 3) and back."""
    ps = torch.stack([data.draw(family_params(family)) for _ in range(6)]).reshape(2, 3, -1).to(device)
    A = G.to_matrix(family, ps)
    assert A.shape == (2, 3, 3, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(A[i, j], G.to_matrix(family, ps[i, j]))
    check(G.from_matrix(family, A), ps)


@given(p=family_params("projective"), lam=st.floats(0.1, 10.0) | st.floats(-10.0, -0.1))
def test_projective_from_matrix_normalises_scale(p, lam, device):
    p = p.to(device)
    A = G.to_matrix("projective", p)
    check(G.from_matrix("projective", lam * A), p, atol=1e-9, rtol=1e-9)


def test_from_matrix_rotation_angle_range_at_plus_180(device):
    check(G.from_matrix("rotation", M("rotation", 180.0, device=device)), T(180.0))
    check(G.from_matrix("rotation", M("rotation", 270.0, device=device)), T(-90.0))
    check(G.from_matrix("rotation", M("rotation", -270.0, device=device)), T(90.0))
    check(G.from_matrix("rigid", M("rigid", 540.0, 1.0, 2.0, device=device)), T(180.0, 1.0, 2.0))


def test_from_matrix_rotation_angle_range_at_minus_180(device):
    angle = G.from_matrix("rotation", M("rotation", -180.0, device=device))
    assert -180.0 < float(angle) <= 180.0


@given(a=st.floats(-1000.0, 1000.0))
def test_from_matrix_angle_is_wrapped(a, device):
    got = float(G.from_matrix("rotation", M("rotation", a, device=device)))
    assume(abs(abs(got) - 180.0) > 1e-6)  # the +-180 edge is covered by the tests above
    assert -180.0 < got <= 180.0
    assert math.isclose(math.remainder(got - a, 360.0), 0.0, abs_tol=1e-8)


# ----------------------------------------------------------------------------- known answers


def test_rotation_matrix_known_answer(device):
    # [[cos, sin], [-sin, cos]] in the centred frame (y down): counter-clockwise as displayed
    check(M("rotation", 90.0, device=device), T([0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]), atol=1e-15,
          rtol=0)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    check(M("rotation", 30.0, device=device), T([c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]))


def test_rotation_direction_on_points(device):
    """rotation(+90): right -> up (y smaller), down -> right, up -> left.

    Fails if the sign of the angle is flipped (right would go down) or if x and y are swapped
    (the matrix applied to (y, x) sends right to down as well).
    """
    R = M("rotation", 90.0, device=device)
    pts = T([1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [2.0, 3.0], device=device)
    check(G.apply_to_points(R, pts), T([0.0, -1.0], [1.0, 0.0], [-1.0, 0.0], [3.0, -2.0]), atol=1e-12, rtol=0)
    # a small positive angle moves the right-hand point slightly up (negative y), still to the right
    q = G.apply_to_points(M("rotation", 10.0, device=device), T([1.0, 0.0], device=device))[0].cpu()
    assert q[0] > 0.9 and q[1] < -0.1


def test_translation_and_scale_known_answers(device):
    d = device
    # tx acts on x (first coordinate), ty on y; fails if swapped
    check(G.apply_to_points(M("translation", 2.0, -1.0, device=d), T([0.0, 0.0], [1.0, 5.0], device=d)),
          T([2.0, -1.0], [3.0, 4.0]))
    check(M("translation", 2.0, -1.0, device=d), T([1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [0.0, 0.0, 1.0]))
    # sx acts on x, sy on y
    check(G.apply_to_points(M("anisotropic_scale", 2.0, 3.0, device=d), T([1.0, 1.0], device=d)), T([2.0, 3.0]))
    check(G.apply_to_points(M("scale", 2.5, device=d), T([1.0, -2.0], device=d)), T([2.5, -5.0]))
    check(M("affine", 1, 2, 3, 4, 5, 6, device=d), T([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 1.0]))
    check(M("projective", 1, 2, 3, 4, 5, 6, 7, 8, device=d), T([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 1.0]))


@given(a=angles, s=scales, tx=shifts, ty=shifts)
def test_composite_families_decompose(a, s, tx, ty, device):
    """rigid = T R, scale_translation = T S (rotate or scale, then translate)."""
    d = device
    Tm, R, S = M("translation", tx, ty, device=d), M("rotation", a, device=d), M("scale", s, device=d)
    check(M("rigid", a, tx, ty, device=d), G.compose(Tm, R))
    check(M("scale_translation", s, tx, ty, device=d), G.compose(Tm, S))


@given(a=angles, s=scales.filter(lambda v: abs(v - 1.0) > 1e-3), tx=shifts, ty=shifts)
def test_similarity_decomposes(a, s, tx, ty, device):
    """similarity = T R S (scale, rotate, then translate); isotropic scaling commutes with R."""
    d = device
    Tm, R, S = M("translation", tx, ty, device=d), M("rotation", a, device=d), M("scale", s, device=d)
    check(M("similarity", a, s, tx, ty, device=d), G.compose(Tm, R, S))
    check(M("similarity", a, s, tx, ty, device=d), G.compose(Tm, S, R))


def test_similarity_known_answer(device):
    """similarity(0, 2, 3, 0): (1, 0) -> 2 * (1, 0) + (3, 0) = (5, 0); the matrix is affine."""
    A = M("similarity", 0.0, 2.0, 3.0, 0.0, device=device)
    check(A, T([2.0, 0.0, 3.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]))
    check(G.apply_to_points(A, T([1.0, 0.0], device=device)), T([5.0, 0.0]))


def test_similarity_with_unit_scale_is_rigid(device):
    """With s = 1 the similarity family does agree with rigid (the part that is not affected by the bug)."""
    check(M("similarity", 33.0, 1.0, 2.0, -5.0, device=device), M("rigid", 33.0, 2.0, -5.0, device=device))


@given(a=angles, b=angles, t1=st.tuples(shifts, shifts), t2=st.tuples(shifts, shifts), s1=scales, s2=scales)
def test_one_parameter_groups(a, b, t1, t2, s1, s2, device):
    def Md(family, *params):
        return M(family, *params, device=device)

    check(G.compose(Md("rotation", a), Md("rotation", b)), M("rotation", a + b))
    check(G.inverse(Md("rotation", a)), M("rotation", -a))
    check(G.compose(Md("translation", *t1), Md("translation", *t2)), M("translation", t1[0] + t2[0], t1[1] + t2[1]))
    check(G.inverse(Md("translation", *t1)), M("translation", -t1[0], -t1[1]))
    check(G.compose(Md("scale", s1), Md("scale", s2)), M("scale", s1 * s2))
    check(G.inverse(Md("scale", s1)), M("scale", 1.0 / s1))


def test_compose_order(device):
    """compose(A, B) applies B first."""
    Tm, R = M("translation", 5.0, 0.0, device=device), M("rotation", 90.0, device=device)
    p = T([1.0, 0.0], device=device)
    check(G.apply_to_points(G.compose(Tm, R), p), T([5.0, -1.0]), atol=1e-12, rtol=0)  # rotate, then shift
    check(G.apply_to_points(G.compose(R, Tm), p), T([0.0, -6.0]), atol=1e-12, rtol=0)  # shift, then rotate


def test_compose_broadcasts(device):
    A = G.to_matrix("rotation", T(10.0, 20.0, 30.0, device=device)[:, None])  # (3, 3, 3)
    Tm = M("translation", 1.0, 2.0, device=device)
    out = G.compose(A, Tm)
    assert out.shape == (3, 3, 3)
    for k in range(3):
        check(out[k], A[k] @ Tm)
    assert G.compose(A[None], A[:, None]).shape == (3, 3, 3, 3)


def test_apply_to_points_perspective_divide_and_batching(device):
    P = M("projective", 1, 0, 0, 0, 1, 0, 0.5, 0, device=device)
    # (2, 4, 1) -> (2, 4, 0.5 * 2 + 1 = 2) -> (1, 2)
    check(G.apply_to_points(P, T([2.0, 4.0], device=device)), T([1.0, 2.0]))
    pts = torch.randn(4, 7, 2, dtype=DT).to(device)
    A = G.to_matrix("rotation", T(10.0, 20.0, 30.0, 40.0, device=device)[:, None])
    out = G.apply_to_points(A, pts)
    assert out.shape == (4, 7, 2)
    check(out[2], pts[2] @ A[2, :2, :2].T)


@given(A=any_matrix())
def test_apply_to_points_is_a_group_action(A, device):
    A = A.to(device)
    pts = torch.linspace(-10, 10, 12, dtype=DT).reshape(6, 2).to(device)
    B = M("similarity", 33.0, 1.3, 2.0, -1.0, device=device)
    check(G.apply_to_points(G.compose(A, B), pts), G.apply_to_points(A, G.apply_to_points(B, pts)),
          atol=1e-8, rtol=1e-8)
    check(G.apply_to_points(G.inverse(A), G.apply_to_points(A, pts)), pts, atol=1e-8, rtol=1e-8)


def test_is_affine(device):
    d = device
    assert G.is_affine(M("rigid", 10.0, 3.0, 4.0, device=d))
    assert G.is_affine(M("scale_translation", 2.0, 3.0, 4.0, device=d))
    assert G.is_affine(G.to_matrix("affine", torch.randn(5, 6, dtype=DT).to(d)))
    assert not G.is_affine(M("projective", 1, 0, 0, 0, 1, 0, 1e-3, 0, device=d))
    assert G.is_affine(M("projective", 1, 0, 0, 0, 1, 0, 1e-3, 0, device=d), atol=1e-2)
    mixed = torch.stack([EYE.to(d), M("projective", 1, 0, 0, 0, 1, 0, 0, 1e-3, device=d)])
    assert not G.is_affine(mixed)


def test_wrap_angle_and_angle_grid(device):
    check(G.wrap_angle(T(0.0, 180.0, -180.0, 190.0, -190.0, 540.0, 359.0, device=device)),
          T(0.0, 180.0, 180.0, -170.0, 170.0, 180.0, -1.0))
    check(G.angle_grid(4, dtype=DT, device=device), T(0.0, 90.0, 180.0, 270.0))
    assert G.angle_grid(7, dtype=torch.float32, device=device).dtype == torch.float32


# ----------------------------------------------------------------------------- frames


def test_pixel_to_normalized_documented_numbers(device):
    """(H, W) = (2, 4): x_n = (2x + 1)/W - 1, y_n = (2y + 1)/H - 1.

    Fails if x and y are swapped (x would be divided by H = 2: pixel x = 3 -> 2.5, not 0.75).
    """
    size = (2, 4)
    px = T([0.0, 0.0], [3.0, 1.0], [1.5, 0.5], [-0.5, -0.5], [3.5, 1.5], [1.0, 0.0])
    nrm = T([-0.75, -0.5], [0.75, 0.5], [0.0, 0.0], [-1.0, -1.0], [1.0, 1.0], [-0.25, -0.5])
    check(G.pixel_to_normalized(px.to(device), size), nrm, atol=1e-15, rtol=0)
    check(G.normalized_to_pixel(nrm.to(device), size), px, atol=1e-15, rtol=0)
    check(G.normalized_to_pixel(T([-1.0, 1.0], device=device), size), T([-0.5, 1.5]))
    check(G.frame_matrix(size, frm="pixel", to="normalized", dtype=DT, device=device),
          T([0.5, 0.0, -0.75], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]))


@given(size=sizes)
def test_frames_known_points(size, device):
    h, w = size
    d = device
    # the image centre is the origin of the centred and normalised frames
    centre = T([(w - 1) / 2, (h - 1) / 2], device=d)
    check(G.apply_to_points(G.frame_matrix(size, frm="pixel", to="centred", dtype=DT, device=d), centre),
          T([0.0, 0.0]))
    check(G.pixel_to_normalized(centre, size), T([0.0, 0.0]))
    # the corners of the field of view (pixel edges) are +-1
    check(G.pixel_to_normalized(T([-0.5, -0.5], [w - 0.5, h - 0.5], device=d), size), T([-1.0, -1.0], [1.0, 1.0]))
    # one pixel is 2/W in normalised x and 2/H in normalised y; the centred frame has pixel units
    C = G.frame_matrix(size, frm="centred", to="normalized", dtype=DT, device=d)
    check(C, T([2.0 / w, 0.0, 0.0], [0.0, 2.0 / h, 0.0], [0.0, 0.0, 1.0]))


@given(size=sizes, pts=st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=1, max_size=5))
def test_frame_round_trips_and_chain(size, pts, device):
    p = torch.tensor(pts, dtype=DT)
    check(G.normalized_to_pixel(G.pixel_to_normalized(p.to(device), size), size), p)
    frames = ("pixel", "centred", "normalized")
    kw = dict(dtype=DT, device=device)
    for a in frames:
        for b in frames:
            fab = G.frame_matrix(size, frm=a, to=b, **kw)
            check(fab @ G.frame_matrix(size, frm=b, to=a, **kw), EYE)
            for c in frames:
                check(G.frame_matrix(size, frm=b, to=c, **kw) @ fab, G.frame_matrix(size, frm=a, to=c, **kw))
    check(G.frame_matrix(size, frm="pixel", to="pixel", **kw), EYE)


def test_frame_matrix_dtype(device):
    f32 = G.frame_matrix((3, 5), frm="pixel", to="centred", dtype=torch.float32, device=device)
    assert f32.dtype == torch.float32 and f32.device.type == device.type
    assert G.frame_matrix((3, 5), frm="pixel", to="centred").dtype == torch.get_default_dtype()
    pts = G.pixel_to_normalized(torch.zeros(1, 2, dtype=DT, device=device), (3, 5))
    assert pts.dtype == DT and pts.device.type == device.type


def test_centred_to_normalized_translation_by_half_width_is_one(device):
    """A shift of W/2 pixels is 1.0 in normalised x; H/2 pixels is 1.0 in normalised y.

    Fails if x and y are swapped (W/2 = 5 px would become 5 * 2/H = 5/3).
    """
    size = (6, 10)
    N = G.centred_to_normalized(M("translation", 5.0, 0.0, device=device), size)
    check(N, T([1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]))
    N = G.centred_to_normalized(M("translation", 0.0, 3.0, device=device), size)
    check(N, T([1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]))
    # the doctest: 7 px of a 28-pixel-wide image is 0.5
    check(G.centred_to_normalized(M("translation", 7.0, 0.0, device=device), (28, 28))[0, 2],
          torch.tensor(0.5, dtype=DT))


def test_centred_to_normalized_rotation_non_square(device):
    """Square grids keep rotations; for H != W the normalised matrix is [[c, s H/W], [-s W/H, c]]."""
    a = 30.0
    c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
    R = M("rotation", a, device=device)
    check(G.centred_to_normalized(R, (16, 16)), R)
    h, w = 10, 20
    check(G.centred_to_normalized(R, (h, w)), T([c, s * h / w, 0.0], [-s * w / h, c, 0.0], [0.0, 0.0, 1.0]))
    check(G.centred_to_normalized(M("scale", 1.7, device=device), (h, w)), M("scale", 1.7))


def test_normalised_frame_is_shared_across_resolutions(device):
    """A 2-pixel shift of a 8x12 image is the same normalised map as a 1-pixel shift of its 4x6 half."""
    check(G.centred_to_normalized(M("translation", 2.0, -4.0, device=device), (8, 12)),
          G.centred_to_normalized(M("translation", 1.0, -2.0, device=device), (4, 6)))
    A = M("affine", 1.1, 0.2, 0.0, -0.3, 0.9, 0.0, device=device)
    check(G.centred_to_normalized(A, (8, 12)), G.centred_to_normalized(A, (4, 6)))


@given(A=any_matrix(), size=sizes)
def test_centred_normalized_round_trip_and_point_consistency(A, size, device):
    A = A.to(device)
    N = G.centred_to_normalized(A, size)
    assert N.dtype == DT and N.device.type == device.type
    back = G.normalized_to_centred(N, size)
    check(back, A / A[2, 2], atol=1e-8, rtol=1e-8)
    # the same point map seen in two frames: C (A p) == N (C p)
    C = G.frame_matrix(size, frm="centred", to="normalized", dtype=DT, device=device)
    p = T([1.5, -2.0], [-3.0, 4.0], [0.0, 0.0], device=device)
    check(G.apply_to_points(C, G.apply_to_points(A, p)), G.apply_to_points(N, G.apply_to_points(C, p)),
          atol=1e-9, rtol=1e-9)


def test_centred_to_normalized_batched(device):
    A = G.to_matrix("rigid", torch.tensor([[10.0, 1.0, 2.0], [20.0, -3.0, 0.5]], dtype=DT, device=device))
    N = G.centred_to_normalized(A, (7, 9))
    assert N.shape == (2, 3, 3)
    check(N[1], G.centred_to_normalized(A[1], (7, 9)))


# ----------------------------------------------------------------------------- dtype / device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_outputs_follow_params_dtype(family, dtype, device):
    p = G.identity_params(family, dtype=dtype, device=device)
    A = G.to_matrix(family, p)
    assert A.dtype == dtype and A.device == p.device and p.device.type == device.type
    for out in (G.from_matrix(family, A), G.inverse(A), G.centred_to_normalized(A, (5, 7))):
        assert out.dtype == dtype and out.device == p.device


def test_to_matrix_accepts_lists_in_default_dtype():
    A = G.to_matrix("translation", [1.0, 2.0])
    assert A.dtype == torch.get_default_dtype()
    assert A[0, 2] == 1.0 and A[1, 2] == 2.0


@pytest.mark.parametrize("family", ["rotation", "similarity", "affine", "projective"])
def test_to_matrix_and_inverse_gradcheck(family, device):
    p = {
        "rotation": T(17.3),
        "similarity": T(17.3, 1.3, 0.37, -1.2),
        "affine": T(1.1, 0.2, 0.37, -0.3, 0.9, -1.2),
        "projective": T(1.1, 0.2, 0.37, -0.3, 0.9, -1.2, 0.01, -0.02),
    }[family].to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: G.inverse(G.to_matrix(family, q)), (p,))
    assert torch.autograd.gradcheck(lambda q: G.centred_to_normalized(G.to_matrix(family, q), (8, 10)), (p,))


# ----------------------------------------------------------------------------- bad inputs


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ValueError, match="family") as info:
        G.to_matrix("shear", T(0.1))
    for name in G.FAMILIES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="family"):
        G.get_family(None)
    with pytest.raises(ValueError, match="family"):
        G.identity_params("rotations")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_wrong_parameter_count(family):
    n = G.FAMILIES[family].n_params
    with pytest.raises(ValueError, match=rf"params.*{n} parameters"):
        G.to_matrix(family, torch.zeros(n + 1, dtype=DT))
    with pytest.raises(ValueError, match="params"):
        G.to_matrix(family, torch.tensor(1.0, dtype=DT))  # 0-d


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_params(bad):
    with pytest.raises(ValueError, match="params.*NaN"):
        G.to_matrix("rigid", T(10.0, bad, 0.0))


def test_integer_params_and_matrices_rejected():
    with pytest.raises(TypeError, match="params.*floating"):
        G.to_matrix("translation", torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="matrix.*floating"):
        G.inverse(torch.eye(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="matrix"):
        G.inverse([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("family,params", [("scale", (0.0,)), ("scale", (-1.0,)), ("anisotropic_scale", (1.0, -2.0)),
                                           ("similarity", (10.0, 0.0, 1.0, 1.0)),
                                           ("scale_translation", (-0.5, 1.0, 1.0))])
def test_non_positive_scale_rejected(family, params):
    with pytest.raises(ValueError, match="params.*> 0"):
        G.to_matrix(family, T(*params))


def test_singular_matrix_inverse():
    with pytest.raises(ValueError, match="matrix.*singular"):
        G.inverse(M("affine", 1.0, 2.0, 3.0, 2.0, 4.0, 1.0))
    with pytest.raises(ValueError, match="matrix.*singular"):
        G.inverse(torch.zeros(3, 3, dtype=DT))
    with pytest.raises(ValueError, match="matrix.*singular"):  # one singular in a batch
        G.inverse(torch.stack([EYE, M("anisotropic_scale", 1.0, 1.0) * T(1.0, 0.0, 1.0)[:, None]]))
    with pytest.raises(ValueError, match="matrix.*NaN"):
        G.inverse(torch.full((3, 3), float("nan"), dtype=DT))


def test_inverse_of_well_conditioned_matrices_in_float64(device):
    # a 30 px shift, a 0.01 scale and a 200 px shift are all well-conditioned
    for A in (M("translation", 30.0, 0.0), M("scale", 0.01), M("rigid", 45.0, 200.0, -150.0)):
        A = A.to(device)
        check(G.compose(A, G.inverse(A)), EYE, atol=1e-9, rtol=0)


@pytest.mark.parametrize("family,params", [("translation", (25.0, 0.0)), ("scale", (0.01,))])
def test_inverse_of_well_conditioned_matrices_in_float32(family, params, device):
    A = G.to_matrix(family, torch.tensor(params, dtype=torch.float32, device=device))
    torch.testing.assert_close(G.compose(A, G.inverse(A)).cpu(), torch.eye(3), atol=1e-5, rtol=0)


def test_bad_matrix_shapes():
    with pytest.raises(ValueError, match=r"matrix.*\(\.\.\., 3, 3\)"):
        G.inverse(torch.eye(2, dtype=DT))
    with pytest.raises(ValueError, match="matrix"):
        G.from_matrix("rotation", torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match=r"matrices\[1\]"):
        G.compose(EYE, torch.eye(4, dtype=DT))
    with pytest.raises(ValueError, match="matrices"):
        G.compose()
    with pytest.raises(ValueError, match="points"):
        G.apply_to_points(EYE, torch.zeros(4, 3, dtype=DT))
    with pytest.raises(TypeError, match="points"):
        G.apply_to_points(EYE, torch.zeros(4, 2, dtype=torch.int64))


@pytest.mark.parametrize("size", [(0, 4), (4, -1), (4,), (1, 2, 3), None, "ab", (3, "x")])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        G.frame_matrix(size, frm="pixel", to="normalized")
    with pytest.raises(ValueError, match="size"):
        G.pixel_to_normalized(torch.zeros(1, 2, dtype=DT), size)
    with pytest.raises(ValueError, match="size"):
        G.centred_to_normalized(EYE, size)


def test_non_integer_size_rejected():
    with pytest.raises(ValueError, match="size"):
        G.frame_matrix((2.5, 4), frm="pixel", to="normalized")


def test_unknown_frame_lists_valid_ones():
    with pytest.raises(ValueError, match="frm.*pixel, centred, normalized"):
        G.frame_matrix((3, 4), frm="centered", to="pixel")
    with pytest.raises(ValueError, match="to.*pixel, centred, normalized"):
        G.frame_matrix((3, 4), frm="pixel", to="image")
