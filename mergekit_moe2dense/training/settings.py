# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What `heal` and `collapse` take: their inputs and the training run, as typed settings.

`TrainSettings` is the training run both share (tokens, sequence length, optimiser, device,
dtype, checkpoints, logging); `HealSettings` and `CollapseSettings` add each one's inputs and
options. The field names are the command line's flags (`max_tokens` is `--max-tokens`), and so
are the names in the messages of a bad value. Only cheap checks of the values live here; what
needs the models or the machine (the device, the vocabularies, OUT) is checked by `heal` and
`collapse` before they load anything.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, get_args

from pydantic import Field, field_validator, model_validator

from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.settings import PathName, Settings, at_least

__all__ = ["SCHEDULES", "CollapseSettings", "HealError", "HealSettings", "TrainSettings"]


class HealError(Moe2DenseError, ValueError):
    """Bad input to `heal` or `collapse`."""


DType = Literal["float32", "bfloat16", "float16"]
Schedule = Literal["linear", "exponential", "constant"]
SCHEDULES = get_args(Schedule)


class TrainSettings(Settings):
    """The training run of a heal or a collapse (the flags of the same names)."""

    error: ClassVar = HealError

    max_tokens: int
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 1e-4
    temperature: float = 1.0
    lm_weight: float = 0.0  # 0: pure KD; 1: pure LM
    warmup: float = 0.05  # a fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: DType = "float32"  # compute dtype: bfloat16 / float16 train mixed precision on float32 weights
    save_steps: int = 0  # 0: no checkpoints
    logging_steps: int = 10
    extra: dict = Field(default_factory=dict)

    # Where the run computes and how often it logs or saves: a checkpoint resumes under others
    NOT_DEFINING: ClassVar[tuple[str, ...]] = ("device", "save_steps", "logging_steps", "extra")

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int) -> int:
        return at_least(value, 1, "--max-tokens")

    @field_validator("seq_len")
    @classmethod
    def _seq_len(cls, value: int) -> int:
        return at_least(value, 2, "--seq-len")

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int) -> int:
        return at_least(value, 1, "--batch-size")

    @field_validator("lr", "temperature")
    @classmethod
    def _positive(cls, value: float, info) -> float:
        if not value > 0:  # NaN too
            raise ValueError(f"--{info.field_name} must be positive, got {value}")
        return value

    @field_validator("lm_weight")
    @classmethod
    def _lm_weight(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"--lm-weight must be between 0 and 1, got {value}")
        return value

    @field_validator("save_steps")
    @classmethod
    def _save_steps(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"--save-steps must be 0 (no checkpoints) or more, got {value}")
        return value

    def defining(self) -> dict:
        """The settings that define the training run, by flag (`trainer.DistillTrainer.run`)."""
        values = self.model_dump()
        return {f"--{name.replace('_', '-')}": values[name] for name in values if name not in self.NOT_DEFINING}

    @property
    def torch_dtype(self):
        """`dtype` as a torch.dtype (torch imported here: this module loads nothing heavy)."""
        import torch

        return getattr(torch, self.dtype)

    def steps(self, world_size: int = 1) -> int:
        """Optimiser steps for `max_tokens` (rounded up to whole global batches)."""
        return math.ceil(self.max_tokens / (self.batch_size * world_size * self.seq_len))


class HealSettings(Settings):
    """A heal: distil `teacher` (the MoE) into `student` (its dense conversion) on `data`.

    - `training`: the run (tokens, sequence length, learning rate, KD/LM mix, checkpoints...).
    - `hidden_weight`: add this weight times the hidden-state loss (`losses.hidden_loss`: the
      student's decoder-layer outputs against the teacher's) to the KD/LM mix; 0: none.
    - `lora_rank`, `lora_alpha`: train LoRA adapters of this rank (alpha: 2 x rank when unset),
      merged into the weights at the end, instead of every weight.
    - `teacher_cache`, `teacher_top_k`: store the teacher's top-k logits in this directory
      first, then train without the teacher in memory.
    - `eval_data`, `eval_max_tokens`: held-out text, scored before and after.
    - `checkpoint_dir` (default: OUT.checkpoints), `resume`, `keep_checkpoints`.
    """

    error: ClassVar = HealError

    student: PathName
    teacher: PathName
    data: PathName
    training: TrainSettings
    hidden_weight: float = 0.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    teacher_cache: PathName | None = None
    teacher_top_k: int = 64
    eval_data: PathName | None = None
    eval_max_tokens: int | None = None
    checkpoint_dir: PathName | None = None
    resume: bool = False
    keep_checkpoints: bool = False

    @field_validator("hidden_weight")
    @classmethod
    def _hidden_weight(cls, value: float) -> float:
        if not (value >= 0 and math.isfinite(value)):  # NaN too
            raise ValueError(f"--hidden-weight must be 0 (no hidden-state loss) or more, got {value}")
        return value

    @field_validator("lora_rank")
    @classmethod
    def _lora_rank(cls, value: int | None) -> int | None:
        return at_least(value, 1, "--lora-rank")

    @model_validator(mode="after")
    def _hidden_needs_the_teacher(self) -> HealSettings:
        if self.hidden_weight > 0 and self.teacher_cache:
            raise ValueError(
                "--hidden-weight needs the teacher's hidden states, and --teacher-cache stores only its logits: "
                "drop --teacher-cache (the teacher runs on the fly) or set --hidden-weight 0"
            )
        return self

    @field_validator("teacher_top_k")
    @classmethod
    def _teacher_top_k(cls, value: int) -> int:
        return at_least(value, 1, "--teacher-top-k")

    @property
    def effective_lora_alpha(self) -> float | None:
        """The LoRA alpha used: `lora_alpha`, or 2 x rank when unset (None without LoRA)."""
        return (self.lora_alpha or 2 * self.lora_rank) if self.lora_rank is not None else None


class CollapseSettings(Settings):
    """A collapse: train `moe` on `data` with its experts pulled together, then convert it.

    - `training`: the run; its `lm_weight` below 1 mixes in KD from the original MoE.
    - `penalty_max`, `schedule`: lambda at the end of the run, and how it rises to it.
    - `save_moe`: also write the collapsed MoE there.
    - `allow_inexact`: write the dense model even if the experts did not collapse.
    """

    error: ClassVar = HealError

    moe: PathName
    data: PathName
    training: TrainSettings
    penalty_max: float = 1e4
    schedule: Schedule = "linear"
    save_moe: PathName | None = None
    allow_inexact: bool = False

    @field_validator("penalty_max")
    @classmethod
    def _penalty_max(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"--penalty-max must be positive, got {value}")
        return value
