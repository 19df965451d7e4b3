"""invariance: can a CNN's feature maps be aligned under spatial transformations?

The toolkit measures, for ANY torch CNN, how well the feature maps of transformed images can be
aligned with those of the originals by the best purely spatial warp, and how much of what is
left a channel permutation or a linear channel map removes (Finnveden, Jansson & Lindeberg 2020).

Public API (everything else is private):

* geometry: :mod:`invariance.geometry` (the one home of the conventions), :mod:`invariance.warp`
* features: :func:`extract_features`, :class:`LayerFrame`, :func:`list_layers`
* search: :func:`align`, :class:`SearchConfig`, :func:`fit_linear`, :func:`channel_orbits`
* metrics: :func:`measure`, :func:`parse_transforms`, :class:`Transform`, :class:`Report`;
  the one measurement core :func:`measure_layer` (:class:`LayerResult`), with
  :func:`comparison_region`, :func:`transformed_valid` and :func:`interpolation_floor`
  (definitions: docs/definitions.md)
* models: :func:`load_model`, :func:`builtin_models`
* test kit: :mod:`invariance.testing`

>>> import torch, invariance
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.ReLU())
>>> images = torch.nn.functional.pad(torch.rand(4, 1, 16, 16), (6, 6, 6, 6))  # zero margin
>>> rep = invariance.measure(net, images, "translation:3,-2", layers="1",
...                         channels="spatial", n_boot=50, progress=False)
>>> rep.records[0]["spatial_error"] < 1e-6, rep.records[0]["best_params"]["median"]
(True, [-3.0, 2.0])
"""

from . import geometry, warp
from .features import INPUT, FeatureExtractor, LayerFrame, extract_features, list_layers
from .geometry import FAMILIES
from .measure import CHANNEL_MODES, DEFAULT_SEARCH, Transform, measure, parse_transforms
from .metric import LayerResult, comparison_region, interpolation_floor, measure_layer, transformed_valid
from .models import builtin_models, load_model
from .report import Report
from .search import SEARCH_FAMILIES, Alignment, SearchConfig, align, channel_orbits, fit_linear, masked_error
from .warp import transform_images

__version__ = "0.1.0"

__all__ = [
    "geometry", "warp", "FAMILIES", "transform_images",
    "INPUT", "FeatureExtractor", "LayerFrame", "extract_features", "list_layers",
    "SEARCH_FAMILIES", "Alignment", "SearchConfig", "align", "channel_orbits", "fit_linear", "masked_error",
    "CHANNEL_MODES", "DEFAULT_SEARCH", "Transform", "measure", "parse_transforms", "Report",
    "LayerResult", "measure_layer", "interpolation_floor", "comparison_region", "transformed_valid",
    "builtin_models", "load_model",
]
