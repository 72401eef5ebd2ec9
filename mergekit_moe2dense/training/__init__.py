# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Training after the conversion: `heal` (distil the MoE into its dense conversion) and
`collapse` (train the MoE's experts together until they are identical, then convert).

- `settings.py`       `TrainSettings`, `HealSettings`, `CollapseSettings`: what each takes
- `inputs.py`         the checks of the models and directories, the training sequences
- `trainer.py`        transformers' `Trainer` with the distillation loss; checkpoints and resume
- `losses.py`         the KD and LM losses (pure math)
- `teacher_cache.py`  the teacher's top-k logits, computed once layer by layer
- `distill.py`        `heal`;  `collapse.py`  `collapse`
"""

from mergekit_moe2dense.training.collapse import CollapseResult, collapse
from mergekit_moe2dense.training.distill import HealResult, heal
from mergekit_moe2dense.training.settings import CollapseSettings, HealError, HealSettings, TrainSettings

__all__ = [
    "CollapseResult",
    "CollapseSettings",
    "HealError",
    "HealResult",
    "HealSettings",
    "TrainSettings",
    "collapse",
    "heal",
]
