"""Spatial transformer networks: where the transformer sits, what its localisation network sees.

``stn`` implements the spatial transformer networks of Jaderberg et al. (2015) in the variants
compared by Finnveden, Jansson and Lindeberg (2020), trains them on transformed MNIST and
Fashion-MNIST, and reproduces the paper's MNIST table. It builds on :mod:`invariance` (geometry
conventions, warping, data loading, checkpoints, the alignment engine); ``invariance`` never
imports ``stn``.

Architectures (built from a configuration by :func:`build_model`)
    ``CNN``; ``STN-CX`` (the transformer warps the classifier's feature maps at depth X; X = 0 is
    the input); ``STN-DLX`` (warps the input; the localisation network is a fresh copy of the
    first X classifier layers + a localisation head); ``STN-SLX`` (warps the input; the
    localisation network *shares* the classifier's first X layers); several digits are
    iterative / multi-depth variants (``STN-C0123``, ``STN-SL0123``, ``STN-SL11``) that compose
    the transformations and always resample the *original* input. Classifiers: ``mnist``
    (Conv 9x9 64 -> pool -> ReLU -> Conv 7x7 64 -> pool -> ReLU -> linear) and ``svhn`` (eight
    5x5 conv blocks 48-64-128-160-192-192-192-192, pooling every second block, dropout).

Spatial transformer (:class:`SpatialTransformer`)
    :class:`SpatialTransformer`: localisation network -> zero-initialised regressor -> parameters
    of any family of :mod:`invariance.geometry` (translation, rotation, scale, rigid,
    similarity, affine, projective, ...) -> ``affine_grid`` (or a projective grid) ->
    ``grid_sample``. Device agnostic: the same code runs on CUDA.

Data (:class:`TransformedDataset`)
    rotated (28x28, +-90 degrees), translated (60x60, +-16 px, clutter) and scaled (112x112,
    2^U(-1, 2), clutter) MNIST / Fashion-MNIST, rendered a batch at a time on the training device,
    re-drawn every epoch from ``(seed, epoch)``, test sets fixed; every sample comes with its
    applied transformation parameters. Reduced-resolution variants for CPU runs.

Training and evaluation (:func:`train`, :func:`evaluate`, :func:`canonical_pose`, :func:`feature_map_alignment`)
    SGD with a learning-rate multiplier for the localisation networks, weight decay, milestones
    and seeds; an atomic checkpoint every epoch; ``resume`` continues bit-identically on the CPU.
    Evaluation: test error, the canonical-pose statistic, and for STN-C1 the alignment errors of
    its transformed feature maps (:func:`invariance.align`).

The ``stn`` command
-------------------
::

    stn train --arch STN-SL1 --dataset mnist --transform rotation --epochs 10 --out runs/sl1
    stn train ... --resume                  # continue an interrupted run (loses at most one epoch)
    stn evaluate runs/sl1                   # test error, canonical pose, (STN-C1) alignment errors
    stn reproduce --quick                   # the paper's MNIST table on a CPU, within an hour
    stn reproduce --out runs/full           # the full protocols (for a GPU)

``--device auto`` (the default) uses CUDA when present. Names that are not known (architecture,
data set, transformation, family) are rejected with the list of valid ones. On a shared,
busy CPU, ``OMP_WAIT_POLICY=PASSIVE`` avoids a large slow-down of PyTorch's thread pool.

Python
------
>>> import torch, stn
>>> model = stn.build_model("STN-SL1", family="rotation")
>>> logits, transforms = model.forward_with_transforms(torch.rand(2, 1, 28, 28))
>>> logits.shape, transforms.composed.shape
(torch.Size([2, 10]), torch.Size([2, 3, 3]))
"""

from ._analysis import canonical_pose, feature_map_alignment, pose_quantity
from ._budget import BUDGETS, Budget, StepSchedule, batch_at_step, evaluate_repeats, reproduce_budget, train_together
from ._data import DIGIT_SIZE, PROTOCOLS, Protocol, TransformedDataset, get_protocol, load_transformed
from ._models import ArchSpec, STNClassifier, Transforms, build_model, count_parameters, parse_arch, valid_arch_names
from ._reproduce import ARCHS, MODES, PAPER_TABLE, TRANSFORMS, Mode, check_claims, plan, reproduce
from ._train import (
                     DEFAULT_FAMILY,
                     DivergedError,
                     RunError,
                     TrainConfig,
                     evaluate,
                     evaluate_model,
                     load_run,
                     machine_info,
                     resolve_device,
                     train,
)
from ._transformer import STN_FAMILIES, LocalisationHead, SpatialTransformer, raw_to_matrix, raw_to_params, resample

__all__ = [
    # data
    "DIGIT_SIZE", "PROTOCOLS", "Protocol", "TransformedDataset", "get_protocol", "load_transformed",
    # architectures and the transformer
    "ArchSpec", "STNClassifier", "Transforms", "build_model", "parse_arch", "valid_arch_names", "count_parameters",
    "STN_FAMILIES", "LocalisationHead", "SpatialTransformer", "raw_to_params", "raw_to_matrix", "resample",
    # training and evaluation
    "TrainConfig", "DEFAULT_FAMILY", "RunError", "DivergedError", "train", "evaluate", "evaluate_model", "load_run",
    "resolve_device", "machine_info",
    # analysis
    "canonical_pose", "pose_quantity", "feature_map_alignment",
    # the paper's table
    "ARCHS", "TRANSFORMS", "PAPER_TABLE", "MODES", "Mode", "plan", "check_claims", "reproduce",
    # the budgeted (GPU) path
    "StepSchedule", "Budget", "BUDGETS", "train_together", "batch_at_step", "evaluate_repeats", "reproduce_budget",
]
