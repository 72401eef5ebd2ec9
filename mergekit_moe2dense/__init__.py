# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit-moe2dense: merge the experts of a Mixture-of-Experts LLM into a dense model.

The Python API is what the command line runs, one function per command, each taking a typed
settings object (as the conversion takes its config):

- `convert(config, out)`: the conversion (`mergekit-moe2dense CONFIG OUT`);
- `inspect(model, InspectSettings(...))`: whether the MoE's experts can be averaged;
- `evaluate(models, EvalSettings(...))`: perplexity and benchmarks, side by side;
- `heal(HealSettings(...), out)` and `collapse(CollapseSettings(...), out)`: training after
  (or before) the conversion.

Every error they raise for bad input is a `Moe2DenseError`.

Importing the package loads nothing heavy, so that the command line starts at once and a
Ctrl-C while torch loads is caught (cli_startup.py): each function imports what it runs when
called, and the settings types are loaded when first taken from here. The merge methods are
registered with mergekit's registry when `METHODS`, `get_method` or `register_methods` is
first taken from here, and by our mergekit plugin (the `mergekit.plugins` entry point, or the
`.pth` hook where mergekit loads no plugins) before it routes a config to us.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mergekit_moe2dense.errors import Moe2DenseError

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

    from mergekit_moe2dense.build import BuildResult
    from mergekit_moe2dense.config import Moe2DenseConfig
    from mergekit_moe2dense.evaluation import EvalReport, EvalSettings
    from mergekit_moe2dense.inspection import InspectionReport, InspectSettings
    from mergekit_moe2dense.training import CollapseResult, CollapseSettings, HealResult, HealSettings

__all__ = [
    "METHODS",
    "BuildResult",
    "CollapseResult",
    "CollapseSettings",
    "EvalReport",
    "EvalSettings",
    "HealResult",
    "HealSettings",
    "InspectSettings",
    "InspectionReport",
    "Moe2DenseConfig",
    "Moe2DenseError",
    "TrainSettings",
    "collapse",
    "convert",
    "evaluate",
    "get_method",
    "heal",
    "inspect",
    "register_methods",
]
__version__ = "0.1.0"

_METHODS_API = ("METHODS", "get_method", "register_methods")
_TRAINING_TYPES = ("CollapseResult", "CollapseSettings", "HealResult", "HealSettings", "TrainSettings")


def convert(
    config: Moe2DenseConfig | str | os.PathLike,
    out_path: str,
    *,
    options: MergeOptions | None = None,
    stats_path: str | None = None,
    overwrite: bool = False,
) -> BuildResult:
    """Convert an MoE as its config asks: a dense model, several, or a smaller MoE at `out_path`.

    Args:
        config: The conversion's config, or the path of its YAML file (then recorded in the
            model card as written).
        out_path: The output directory: written whole or not at all.
        options: mergekit's merge options (device, dtype of the output, shard size...).
        stats_path: Router statistics from an earlier run (its output directory or the
            statistics file), instead of a calibration.
        overwrite: Replace `out_path` if it is not empty.

    Returns:
        Where the output is, the per-layer expert weights, the method's parameters and the
        router statistics.

    Raises:
        Moe2DenseError: Bad input, found before any expensive work where it can be.
    """
    from mergekit_moe2dense.build import build_dense
    from mergekit_moe2dense.config import Moe2DenseConfig, read_config_text

    source = None
    if not isinstance(config, Moe2DenseConfig):
        path = os.fspath(config)
        source = read_config_text(path)
        config = Moe2DenseConfig.from_yaml(source, source=path)
    return build_dense(
        config, os.fspath(out_path), options, stats_path=stats_path, overwrite=overwrite, config_source=source
    )


def inspect(model: str, settings: InspectSettings | None = None, *, progress: bool = False) -> InspectionReport:
    """Whether averaging the MoE's experts can work: expert similarity, unit matching, router
    usage, and a verdict with the methods it suggests.

    Args:
        model: The MoE's model directory.
        settings: Router usage from statistics or a short calibration, the report files, the
            device (default: the weights alone, nothing written).
        progress: Show a progress bar.

    Returns:
        The report, per layer and for the model.

    Raises:
        InspectionError: Conflicting settings or statistics of another model (a `Moe2DenseError`).
    """
    from mergekit_moe2dense.inspection import inspect_moe

    return inspect_moe(os.fspath(model), settings, progress=progress)


def evaluate(models: list[str], settings: EvalSettings, *, progress: bool = True) -> EvalReport:
    """Perplexity on text and lm-evaluation-harness benchmarks of causal LMs, side by side.

    Args:
        models: Local model directories, scored one at a time; the first is the reference
            unless `settings.reference` names another.
        settings: What to score (`data`, `tasks`) and how.
        progress: Draw the perplexity's progress bars (`eval --quiet`: none).

    Returns:
        The results per model, and the tables `eval` prints.

    Raises:
        EvaluationError: A model that cannot be scored, or texts tokenized differently by
            different models (a `Moe2DenseError`); every model is checked before the first is scored.
    """
    from mergekit_moe2dense.evaluation import evaluate as run

    return run(models, settings, progress=progress)


def heal(
    settings: HealSettings,
    out_path: str,
    *,
    overwrite: bool = False,
    callbacks: list | None = None,
    progress: bool = True,
) -> HealResult:
    """Distil the MoE (the teacher) into its dense conversion (the student), write the healed
    student to `out_path`.

    Args:
        settings: The student, the teacher, the data and the training run.
        out_path: The output directory: written whole or not at all.
        overwrite: Replace `out_path` if it is not empty.
        callbacks: transformers `TrainerCallback`s added to the training.
        progress: Show progress bars.

    Returns:
        The run's steps, tokens, losses, throughput and perplexities, and its record.

    Raises:
        HealError: Bad input: models, vocabularies, directories, a checkpoint of another run
            (a `Moe2DenseError`).
    """
    from mergekit_moe2dense.training import heal as run

    return run(settings, os.fspath(out_path), overwrite=overwrite, callbacks=callbacks, progress=progress)


def collapse(
    settings: CollapseSettings,
    out_path: str,
    *,
    overwrite: bool = False,
    callbacks: list | None = None,
    progress: bool = True,
) -> CollapseResult:
    """Train the MoE with its experts pulled together until they are identical, then convert it
    with `expert_uniform` into the dense model at `out_path`.

    Args:
        settings: The MoE, the data, the training run and the penalty.
        out_path: The output directory: written whole or not at all.
        overwrite: Replace `out_path` (and `settings.save_moe`) if not empty.
        callbacks: transformers `TrainerCallback`s added to the training.
        progress: Show progress bars.

    Returns:
        The run's steps and tokens, the experts' spread at the end, and its record.

    Raises:
        HealError: Bad input, or experts that did not collapse without `allow_inexact`
            (a `Moe2DenseError`).
    """
    from mergekit_moe2dense.training import collapse as run

    return run(settings, os.fspath(out_path), overwrite=overwrite, callbacks=callbacks, progress=progress)


def __getattr__(name):
    """The merge methods (registered with mergekit on first use) and the settings and result
    types, imported when first taken."""
    if name in _METHODS_API:
        from mergekit_moe2dense import methods

        methods.register_methods()
        return getattr(methods, name)
    if name in _TRAINING_TYPES:
        from mergekit_moe2dense import training

        return getattr(training, name)
    if name in ("InspectSettings", "InspectionReport"):
        from mergekit_moe2dense import inspection

        return getattr(inspection, name)
    if name in ("EvalSettings", "EvalReport"):
        from mergekit_moe2dense import evaluation

        return getattr(evaluation, name)
    if name == "Moe2DenseConfig":
        from mergekit_moe2dense.config import Moe2DenseConfig

        return Moe2DenseConfig
    if name == "BuildResult":
        from mergekit_moe2dense.build import BuildResult

        return BuildResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
