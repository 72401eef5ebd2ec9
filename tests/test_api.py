# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The Python API: one function per command, importable at no cost, and typed settings whose
bad values fail when they are made, as the command's own `Moe2DenseError` naming what to change."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pydantic
import pytest

from mergekit_moe2dense import Moe2DenseError
from mergekit_moe2dense.evaluation import EvalSettings
from mergekit_moe2dense.inspection import InspectionError, InspectSettings
from mergekit_moe2dense.perplexity import EvaluationError, PerplexitySettings
from mergekit_moe2dense.training import CollapseSettings, HealError, HealSettings, TrainSettings

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = ("convert", "inspect", "evaluate", "heal", "collapse")


def test_importing_the_package_loads_nothing_heavy():
    code = (
        "import sys, mergekit_moe2dense; "
        "print(sorted(m for m in ('torch', 'transformers', 'mergekit', 'pydantic') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_the_api_functions_stay_functions_once_every_module_is_loaded():
    """No module of the package is named as a function of the API: importing it would replace
    the function on the package."""
    import mergekit_moe2dense.evaluation
    import mergekit_moe2dense.inspection
    import mergekit_moe2dense.perplexity
    import mergekit_moe2dense.training  # noqa: F401

    for name in FUNCTIONS:
        assert isinstance(getattr(mergekit_moe2dense, name), types.FunctionType), name
        assert name in mergekit_moe2dense.__all__
    assert mergekit_moe2dense.HealSettings is HealSettings
    assert mergekit_moe2dense.InspectSettings is InspectSettings


def training(**values) -> TrainSettings:
    return TrainSettings(max_tokens=64, **values)


BAD = {
    "max_tokens": (lambda: TrainSettings(max_tokens=0), HealError, "--max-tokens must be at least 1, got 0"),
    "lm_weight": (lambda: training(lm_weight=1.5), HealError, "--lm-weight must be between 0 and 1, got 1.5"),
    "dtype": (lambda: training(dtype="int8"), HealError, "dtype: Input should be 'float32', 'bfloat16' or"),
    "misspelt": (lambda: training(learning_rate=1e-3), HealError, "learning_rate: Extra inputs are not permitted"),
    "nested": (
        lambda: HealSettings(student="s", teacher="t", data="d", training={"max_tokens": -1}),
        HealError,
        "--max-tokens must be at least 1, got -1",
    ),
    "lora_rank": (
        lambda: HealSettings(student="s", teacher="t", data="d", training=training(), lora_rank=0),
        HealError,
        "--lora-rank must be at least 1, got 0",
    ),
    "schedule": (
        lambda: CollapseSettings(moe="m", data="d", training=training(), schedule="cubic"),
        HealError,
        "schedule: Input should be 'linear', 'exponential' or 'constant' (got 'cubic')",
    ),
    "penalty": (
        lambda: CollapseSettings(moe="m", data="d", training=training(), penalty_max=float("nan")),
        HealError,
        "--penalty-max must be positive, got nan",
    ),
    "stats and data": (lambda: InspectSettings(stats_path="s", data="d"), InspectionError, "give --stats or --data"),
    "engine": (lambda: InspectSettings(engine="full"), InspectionError, "--engine and --dtype set the calibration"),
    "calibration": (
        lambda: InspectSettings(data="d", num_samples=0),
        InspectionError,
        "num_samples: Input should be greater than 0",
    ),
    "nothing to score": (lambda: EvalSettings(), EvaluationError, "eval needs --data (perplexity), --tasks"),
    "stride": (lambda: PerplexitySettings(seq_len=8, stride=9), EvaluationError, "stride must be between 1 and"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_setting_is_one_line_naming_what_to_change(case):
    make, error, message = BAD[case]
    with pytest.raises(error) as raised:
        make()
    assert isinstance(raised.value, Moe2DenseError) and not isinstance(raised.value, pydantic.ValidationError)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_settings_are_frozen_and_read_from_mappings_as_strictly():
    settings = HealSettings(student=Path("s"), teacher="t", data="d", training=training(), lora_rank=4)
    assert settings.student == "s" and settings.effective_lora_alpha == 8
    with pytest.raises(pydantic.ValidationError):
        settings.lora_rank = 8
    assert HealSettings.model_validate(settings.model_dump()) == settings
    with pytest.raises(HealError, match="--max-tokens must be at least 1"):
        HealSettings.model_validate({**settings.model_dump(), "training": {"max_tokens": 0}})
