"""Analytic toy networks with hand-set weights, and the images they are meant to be measured on.

The theory, made executable (summary of ``docs/proof.md``)
-----------------------------------------------------------
*Statement.* Let ``Γ`` be a CNN layer and ``T_h`` a spatial transformation of the image. A purely
spatial warp ``W_g`` of the feature maps can undo ``T_h`` (``W_g Γ T_h f ≈ Γ f``, docs/definitions.md,
"The question") for translations always, for rotations only when the features are rotation
invariant, and for rescalings in general never. Two intuitions carry the argument:

1. *"W" becomes "M".* A 180° rotation turns a W into an M, so a *different channel* responds. A
   warp moves values within each channel and cannot move the response back into the W
   channel: with exclusive (thresholded) detectors the spatial error is at least 1, exactly,
   while the W <-> M swap plus the rotation aligns the maps (:class:`WMNet`;
   ``test_wm_rotation_180_moves_the_response_to_the_other_channel``). With the four 90°
   rotations of one filter (:class:`P4Net`) a 90° rotation is a cyclic channel shift
   (``test_p4_lattice_rotation_is_a_cyclic_channel_shift``), and generic random filters behave
   the same way without the exact bookkeeping
   (``test_random_cnns_with_generic_filters_are_not_alignable``).
2. *A fixed-size filter never covers the rescaled object.* Gaussian-derivative filters at one
   scale (:class:`GaussianJetNet`) see a rescaled image at another level of its scale space:
   the *values* of the maps change and no warp recovers them. For a Gaussian blob the smallest
   error over all warps is known in closed form (:func:`gaussian_blob_scale_error`), positive
   and growing with ``|log s|`` (``test_scale_error_of_a_gaussian_blob_follows_the_continuum_answer``,
   ``test_fixed_scale_filters_are_not_alignable_under_rescaling``). The same filters at several
   scales (:class:`ScaleChannelNet`) turn the rescaling into a shift along the channel axis,
   which a channel shift undoes (``test_scale_channels_turn_a_rescaling_into_a_channel_shift``).

Controls: rotationally symmetric filters (:class:`IsotropicNet`) are alignable under any
rotation down to the interpolation floor (``test_isotropic_filters_are_alignable_under_any_rotation``);
stride-1 stacks with circular padding (:class:`CircularNet`) align integer circular shifts
exactly (``test_circular_stacks_align_integer_translations_exactly``); and the input itself
(the identity network) is alignable under every transformation
(``test_the_input_layer_is_alignable_under_any_transformation``), which is why a spatial
transformer that warps the *input* can support invariance and one that warps deeper feature
maps in general cannot. The tests are in ``tests/test_theory.py``; ``tests/test_toys.py`` pins
the construction of each toy with exact identities.

Built-in models (entries of :func:`invariance.builtin_models`)
--------------------------------------------------------------
* ``toy-wm``: :class:`WMNet`, images ``glyphs`` (48x48 scenes of W or M), layers ``detect``,
  ``rectify``, ``pool``.
* ``toy-scale``: :class:`GaussianJetNet`, images ``blobs``, layer ``jet``.
* ``toy-scale-channels``: :class:`ScaleChannelNet`, images ``blobs``, layer ``jet``.
* ``toy-isotropic``: :class:`IsotropicNet`, images ``blobs``, layers ``conv1, relu1, conv2, relu2``.
* ``toy-p4``: :class:`P4Net`, images ``blobs``, layers ``lift, relu``.
* ``toy-c8``: :class:`C8Net`, images ``blobs``, layers ``lift, relu`` (steerable filters at 45° steps).
* ``toy-circular``: :class:`CircularNet`, images ``blobs``, layers ``conv1, relu1, conv2, relu2``.

Image sources (:func:`make_images`): ``glyphs`` (one letter per scene, W or M, at a random
position and size inside the central disk, anti-aliased strokes) and ``blobs`` (smooth random
anisotropic Gaussian blobs inside a central disk, exactly zero outside it).

Conventions follow :mod:`invariance.geometry`: ``(x, y)`` with y pointing down, rotations
counter-clockwise as displayed (``torch.rot90(k=1, dims=(-2, -1))`` is ``rotation:90``).
``conv2d`` computes a correlation, so a weight that should *convolve* with a kernel holds the
kernel flipped (done by :func:`gaussian_derivative_kernel`).

>>> import torch
>>> net = WMNet()
>>> scene = make_images("glyphs", 2, seed=0, letters="W")
>>> out = net(scene)                         # (2, 2, 24, 24): channel 0 = W, 1 = M, pooled
>>> bool((out[:, 0].amax((1, 2)) > 0).all()), bool((out[:, 1] == 0).all())
(True, True)
>>> rotated = torch.rot90(scene, 2, dims=(-2, -1))          # a W rotated by 180° is an M
>>> bool((net(rotated)[:, 0] == 0).all()), bool((net(rotated)[:, 1].amax((1, 2)) > 0).all())
(True, True)
"""

from __future__ import annotations

from ._toy_images import (
                          IMAGE_SOURCES,
                          W_VERTICES,
                          glyph_scene,
                          make_blob_images,
                          make_glyph_images,
                          make_images,
                          render_polyline,
)
from ._toy_networks import (
                          JET_ORDERS,
                          C8Net,
                          CircularNet,
                          GaussianJetNet,
                          IsotropicNet,
                          P4Net,
                          Rectify,
                          ScaleChannelNet,
                          WMNet,
                          gaussian_blob_scale_error,
                          gaussian_derivative_kernel,
)

__all__ = [
    "W_VERTICES",
    "JET_ORDERS",
    "gaussian_derivative_kernel",
    "gaussian_blob_scale_error",
    "render_polyline",
    "glyph_scene",
    "make_glyph_images",
    "make_blob_images",
    "make_images",
    "IMAGE_SOURCES",
    "Rectify",
    "WMNet",
    "GaussianJetNet",
    "ScaleChannelNet",
    "IsotropicNet",
    "P4Net",
    "C8Net",
    "CircularNet",
]
