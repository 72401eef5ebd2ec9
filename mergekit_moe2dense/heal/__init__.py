# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Training after the conversion: `heal` (distil the MoE into its dense conversion) and
`collapse` (train the MoE's experts together until they are identical, then convert)."""

from mergekit_moe2dense.heal.collapse import CollapseResult, collapse
from mergekit_moe2dense.heal.distill import HealResult, heal
from mergekit_moe2dense.heal.training import HealError, TrainSettings

__all__ = ["CollapseResult", "HealError", "HealResult", "TrainSettings", "collapse", "heal"]
