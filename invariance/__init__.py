"""invariance: can a CNN's feature maps be aligned under spatial transformations?

The toolkit measures, for ANY torch CNN, how well the feature maps of transformed images can be
aligned with those of the originals by the best purely spatial warp, and how much of what is
left a channel permutation or a linear channel map removes (Finnveden, Jansson & Lindeberg 2020).

The public API is what this module exports (``invariance.__all__``, documented in docs/api.md)
and the public submodules :mod:`invariance.geometry` (the one home of the conventions),
:mod:`invariance.testing` (the test kit), :mod:`invariance.reference` (the dense reference
search), :mod:`invariance.datasets`, :mod:`invariance.toys` (analytic networks and images),
:mod:`invariance.checks` (argument checks), :mod:`invariance.files` (atomic writes) and
:mod:`invariance.sweep` (models x layers x transformations as resumable tasks, locally or on Slurm). Modules
whose names start with ``_`` are the implementation and may change without notice.

>>> import torch, invariance
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.ReLU())
>>> images = torch.nn.functional.pad(torch.rand(4, 1, 16, 16), (6, 6, 6, 6))  # zero margin
>>> rep = invariance.measure(net, images, "translation:3,-2", layers="1",
...                         channels="spatial", n_boot=50, progress=False)
>>> rec = rep.records[0]
>>> rec.errors.spatial.mean < 1e-6, rec.best_warp.median
(True, (-3.0, 2.0))
"""

from . import checks, datasets, files, geometry, reference, sweep, testing, toys
from ._features import INPUT, FeatureExtractor, LayerFrame, extract_features, list_layers
from ._lie import LieResult
from ._measure import (
                       CHANNEL_MODES,
                       DEFAULT_CHANNELS,
                       DEFAULT_MEMORY_BUDGET,
                       DEFAULT_SEARCH,
                       MAX_IMAGE_PIXELS,
                       MeasureOptions,
                       as_image_batch,
                       lie_derivative,
                       measure,
                       parse_bytes,
)
from ._metric import (
                       RF_COVERS_IMAGE,
                       LayerAccumulator,
                       LayerResult,
                       comparison_region,
                       interpolation_floor,
                       measure_layer,
                       transformed_valid,
)
from ._models import (
                       BUILTIN_BUILDERS,
                       CHECKPOINT_FORMAT,
                       ZOOS,
                       CheckpointError,
                       ModelInfo,
                       UntrustedCheckpointError,
                       build_from_checkpoint,
                       builtin_models,
                       load_checkpoint,
                       load_model,
                       load_weights,
                       non_finite_weight,
                       register_builder,
                       register_model,
                       registered_builders,
                       save_checkpoint,
                       tensor_checksum,
)
from ._record import (
                       ERROR_KINDS,
                       SCHEMA,
                       BestWarp,
                       Calibration,
                       ChannelMatch,
                       Comparison,
                       Errors,
                       Estimate,
                       Infinitesimal,
                       LayerRecord,
                       bootstrap_ci,
)
from ._report import Report
from ._search import (
                       MIN_REGION,
                       PRESETS,
                       SEARCH_FAMILIES,
                       Alignment,
                       LinearFit,
                       SearchConfig,
                       align,
                       aligned,
                       channel_orbits,
                       fit_linear,
                       masked_error,
                       region_error,
                       search_bytes_per_image,
                       warp_valid,
)
from ._transform import MAX_TRANSFORMS, Transform, check_transform_count, parse_transforms
from ._warp import (
                       MODES,
                       PADDING_MODES,
                       disk_mask,
                       grid_from_inverse,
                       sampling_grid,
                       transform_images,
                       valid_mask,
                       warp,
                       warp_chunks,
)
from ._zoo import (
                       MNIST_CNN_BLOCKS,
                       PRETRAINED_PATH,
                       load_digits,
                       mnist_block,
                       mnist_cnn,
                       pretrained_mnist_cnn,
                       random_mnist_cnn,
)
from .geometry import FAMILIES

__version__ = "0.1.0"

__all__ = [
    # public submodules
    "checks", "datasets", "files", "geometry", "reference", "sweep", "testing", "toys",
    # geometry and warping
    "FAMILIES", "MODES", "PADDING_MODES", "warp", "warp_chunks", "sampling_grid", "grid_from_inverse",
    "transform_images", "disk_mask", "valid_mask",
    # features
    "INPUT", "FeatureExtractor", "LayerFrame", "extract_features", "list_layers",
    # search and the comparison region
    "SEARCH_FAMILIES", "MIN_REGION", "PRESETS", "Alignment", "SearchConfig", "align", "aligned", "region_error",
    "masked_error", "warp_valid", "channel_orbits", "fit_linear", "LinearFit", "search_bytes_per_image",
    # the measurement core and the toolkit's front end
    "RF_COVERS_IMAGE", "LayerResult", "LayerAccumulator", "measure_layer", "interpolation_floor",
    "comparison_region", "transformed_valid", "CHANNEL_MODES", "DEFAULT_SEARCH", "MAX_TRANSFORMS", "MAX_IMAGE_PIXELS",
    "Transform", "measure", "parse_transforms", "check_transform_count", "as_image_batch", "bootstrap_ci", "Report",
    "DEFAULT_MEMORY_BUDGET", "parse_bytes", "MeasureOptions", "DEFAULT_CHANNELS",
    # the infinitesimal view (the `lie` channel)
    "lie_derivative", "LieResult", "Infinitesimal",
    # the typed record of a measurement (docs/report-schema.md)
    "SCHEMA", "ERROR_KINDS", "LayerRecord", "Estimate", "Errors", "BestWarp", "Comparison", "Calibration",
    "ChannelMatch",
    # models and checkpoints
    "CHECKPOINT_FORMAT", "CheckpointError", "ModelInfo", "register_model", "builtin_models", "load_model",
    "load_weights", "save_checkpoint", "load_checkpoint", "build_from_checkpoint", "non_finite_weight",
    "tensor_checksum", "ZOOS",
    "UntrustedCheckpointError", "register_builder", "registered_builders", "BUILTIN_BUILDERS",
    "load_digits", "MNIST_CNN_BLOCKS", "mnist_block", "mnist_cnn", "pretrained_mnist_cnn", "random_mnist_cnn",
    "PRETRAINED_PATH",
]
