"""What a trained STN does: the canonical-pose statistic and the feature-map alignment of STN-C1.

Canonical pose
--------------
An STN need not undo the data's transformation exactly: it is enough to bring every image of a
class to *one* pose. With ``A`` the applied transformation of a test image (its data parameters)
and ``P`` the composed transformation the network predicted (both in the image's centred frame),
the image reaches the classifier in the pose ``T = P A``. Per class we measure the spread of the
relevant part of ``T``:

* rotation: the angle of ``T``; spread = circular standard deviation ``sqrt(-2 ln R)`` (degrees),
  ``R`` the mean resultant length;
* scale: ``log2`` of the scale of ``T`` (``sqrt |det|`` of its linear part); spread = standard
  deviation (octaves);
* translation: the shift of ``T``; spread = ``sqrt(var tx + var ty)`` (pixels of the image).

The same with ``P = I`` (``applied_only``) is the spread of the data itself: the CNN's value.
Smaller is a more canonical pose.

Feature-map alignment of STN-C1
-------------------------------
For pairs ``(f, T_h f)`` of test digits (without clutter, so ``T_h`` acts on the whole image),
with ``F = Gamma_1 f`` and ``F_h = Gamma_1 T_h f`` the feature maps at the transformer's depth
and ``S(.)`` the trained transformer's output on them, we report over the comparison region of
docs/definitions.md (by :func:`invariance.measure_layer`, the toolkit's one measurement
core):

* ``stn_error``: ``||S(F_h) - S(F)||^2 / ||S(F)||^2``: how far from invariant the trained STN's
  transformed maps are;
* ``spatial_error``: ``min_g ||W_g F_h - F||^2 / ||F||^2`` (:func:`invariance.align`):
  the best *any* spatial transformer of these maps could do;
* ``expected_error``: the same for ``g = h^-1``, the warp an STN "should" apply;
* ``input_floor``: the spatial error at the input layer (interpolation only).

For rotations and scalings ``spatial_error`` stays well above the floor (the maps cannot be
aligned by a spatial warp); for translations it does not.
"""

from __future__ import annotations

import numpy as np
import torch

from invariance import (
    DEFAULT_SEARCH,
    Estimate,
    LayerFrame,
    SearchConfig,
    comparison_region,
    interpolation_floor,
    masked_error,
    measure_layer,
    transformed_valid,
)
from invariance import geometry as G

from ._data import Protocol, TransformedDataset
from ._models import STNClassifier

__all__ = ["canonical_pose", "pose_quantity", "circular_std", "feature_map_alignment"]



def circular_std(angles_deg: torch.Tensor) -> float:
    """Circular standard deviation (degrees) of angles in degrees: ``sqrt(-2 ln R)``.

    >>> circular_std(torch.tensor([10.0, 10.0, 10.0])) < 1e-3      # ~1e-6 or 0, by BLAS kernel
    True
    >>> round(circular_std(torch.tensor([179.0, -179.0])), 3)   # wraps around
    1.0
    """
    t = torch.deg2rad(angles_deg.double())
    r = torch.sqrt(torch.cos(t).mean() ** 2 + torch.sin(t).mean() ** 2).clamp(1e-300, 1.0)
    return float(torch.rad2deg(torch.sqrt((-2 * torch.log(r)).clamp_min(0.0)))) + 0.0


def pose_quantity(protocol: Protocol, total: torch.Tensor) -> torch.Tensor:
    """The part of centred-frame matrices ``(N, 3, 3)`` that the protocol varies: ``(N,)`` or ``(N, 2)``."""
    if protocol.name == "rotation":
        return G.from_matrix("similarity", total)[..., 0]
    if protocol.name == "scale":
        return torch.log2(torch.sqrt(torch.det(total[..., :2, :2]).abs()).clamp_min(1e-30))
    return total[..., :2, 2]


def _spread(protocol: Protocol, v: torch.Tensor) -> tuple[float, object]:
    if protocol.name == "rotation":
        t = torch.deg2rad(v)
        mean = float(torch.rad2deg(torch.atan2(torch.sin(t).mean(), torch.cos(t).mean())))
        return circular_std(v), mean
    if protocol.name == "scale":
        return float(v.std(unbiased=False)), float(v.mean())
    return float(torch.sqrt(v.var(0, unbiased=False).sum())), v.mean(0).tolist()


def canonical_pose(protocol: Protocol, labels: torch.Tensor, applied: torch.Tensor,
                   composed: torch.Tensor) -> dict:
    """Per-class spread of the pose ``T = P A`` reached by each test image (see the module docstring).

    Args:
        protocol: the data protocol (its family and image size).
        labels: ``(N,)``.
        applied: ``(N, n)`` the data's parameters (centred frame of the image).
        composed: ``(N, 3, 3)`` the predicted composed transformations, normalised frame.

    Returns a dict with ``quantity``, ``unit``, ``mean_spread`` (mean over classes),
    ``applied_only_mean_spread`` and ``per_class`` (spread and mean pose per class).
    """
    size = (protocol.size, protocol.size)
    a = G.to_matrix(protocol.family, applied.double())
    p = G.normalized_to_centred(composed.double(), size)
    total = p @ a
    q_total, q_applied = pose_quantity(protocol, total), pose_quantity(protocol, a)
    per_class, spreads, base = {}, [], []
    for c in sorted(set(labels.tolist())):
        sel = labels == c
        s, mean = _spread(protocol, q_total[sel])
        s0, _ = _spread(protocol, q_applied[sel])
        per_class[str(c)] = {"spread": s, "mean": mean, "applied_only_spread": s0, "n": int(sel.sum())}
        spreads.append(s)
        base.append(s0)
    quantity, unit = {"rotation": ("angle", "degrees (circular std)"),
                      "scale": ("log2 scale", "octaves (std)"),
                      "translation": ("shift", "pixels (sqrt of the summed variances)")}[protocol.name]
    return {"quantity": quantity, "unit": unit, "mean_spread": float(np.mean(spreads)),
            "applied_only_mean_spread": float(np.mean(base)), "per_class": per_class}


def _identity_params(protocol: Protocol, n: int) -> torch.Tensor:
    val = {"rotation": [0.0], "translation": [0.0, 0.0], "scale": [1.0]}[protocol.name]
    return torch.tensor(val).expand(n, -1).clone()


@torch.no_grad()
def _maps(model: STNClassifier, x: torch.Tensor, depth: int):
    """(map entering the transformer(s) at ``depth``, the transformed map) of an STN-C model."""
    return model.forward_with_feature_maps(x)[2][depth]


def feature_map_alignment(model: STNClassifier, dataset: TransformedDataset, *, n_images: int = 64,
                          depth: int | None = None, config: SearchConfig | None = None, batch: int = 32) -> dict:
    """Feature-map alignment errors of an STN-C model's transformer at ``depth`` (default: the first > 0).

    See the module docstring. Returns a dict: ``arch``, ``depth``, ``search_family``, ``n_images``,
    ``n_excluded``, ``mask``, ``protocol``, and for each of ``stn_error``, ``spatial_error``,
    ``expected_error``, ``invariance_error`` and ``input_floor`` an :class:`invariance.Estimate`
    (mean over the pairs with a verdict, bootstrap 95% interval, per-pair values), the same type
    as the errors of :func:`invariance.measure`'s records.
    """
    spec = model.spec
    if spec.kind != "C" or not [d for d in spec.depths if d > 0]:
        raise ValueError(f"feature_map_alignment: needs an STN-C architecture with a transformer at a depth > 0, "
                         f"got {spec.name}")
    depth = depth if depth is not None else next(d for d in spec.depths if d > 0)
    if depth not in spec.depths:
        raise ValueError(f"depth: {spec.name} has no transformer at depth {depth}")
    proto = dataset.protocol
    family = DEFAULT_SEARCH[proto.family]
    cfg = config or SearchConfig.preset("analysis")
    dev = next(model.parameters()).device
    model.eval()
    n = min(n_images, len(dataset))
    draws = dataset.draws(0)
    rows: dict[str, list] = {k: [] for k in ("stn_error", "spatial_error", "expected_error", "invariance_error",
                                             "input_floor")}
    excluded = 0
    for start in range(0, n, batch):
        index = torch.arange(start, min(n, start + batch))
        f, _ = dataset.render(index, draws, params=_identity_params(proto, len(index)), clutter=False)
        fh, prm = dataset.render(index, draws, clutter=False)
        f, fh = f.to(dev), fh.to(dev)
        (fmap, smap), (fhmap, shmap) = _maps(model, f, depth), _maps(model, fh, depth)
        # the data's transformation of each image (normalised); the maps cover the image's field
        # of view, so their frame is the assumed one (no receptive-field interior)
        t_img = G.centred_to_normalized(G.to_matrix(proto.family, prm.double()), dataset.image_size).to(dev)
        frame = LayerFrame.assumed(fmap.shape[-2:], f.shape[-2:])
        valid = transformed_valid(t_img, f.shape[-2:])
        region, mvalid, _ = comparison_region(frame, image_valid=valid, device=dev, dtype=fmap.dtype)
        rows["stn_error"].append(masked_error(smap, shmap, region, valid=mvalid).cpu())
        with torch.enable_grad():
            res = measure_layer(fmap, fhmap, frame, t_img, family=family, config=cfg, image_valid=valid)
            floor = interpolation_floor(f, t_img, family, config=cfg)
        excluded += res.n_excluded
        rows["invariance_error"].append(res.invariance)
        rows["expected_error"].append(res.expected)
        rows["spatial_error"].append(res.spatial)
        rows["input_floor"].append(floor)
    out: dict = {"arch": spec.name, "depth": depth, "search_family": family, "n_images": n, "n_excluded": excluded,
                 "mask": "comparison region (docs/definitions.md): where both maps are defined",
                 "protocol": proto.describe()}
    for k, v in rows.items():
        out[k] = Estimate.of(torch.cat(v).double(), n_boot=1000, seed=0)
    return out
