# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The layer-sequential re-fit of a dense model's MLPs on the calibration tokens.

- blocks.py: the sparse block as the per-layer step sees it, and the dense MLP replacing it;
- fitters.py: the per-layer steps (closed-form least squares, RegMean, the gradient fit);
- driver.py: the layer loop that runs a step on every planned layer (`fit_layers`).
"""

from mergekit_moe2dense.calibration.refit.blocks import DenseMLP, SparseBlock
from mergekit_moe2dense.calibration.refit.driver import RefitResult, fit_layers, refit_layers
from mergekit_moe2dense.calibration.refit.fitters import (
    REFIT_MODES,
    LayerFit,
    LayerFitter,
    closed_form_fit,
    gradient_fit,
    refit_fitter,
)

__all__ = [
    "REFIT_MODES",
    "DenseMLP",
    "LayerFit",
    "LayerFitter",
    "RefitResult",
    "SparseBlock",
    "closed_form_fit",
    "fit_layers",
    "gradient_fit",
    "refit_fitter",
    "refit_layers",
]
