# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Standard benchmarks through lm-evaluation-harness (`pip install mergekit-moe2dense[eval]`).

`eval --tasks hellaswag,arc_easy,./my_tasks` runs lm-eval's `simple_evaluate` with its
`hf` model on each model in turn (the MoE and its dense conversions, say) and prints one
table: every task's metrics per model, and each model's difference to the reference
model. A task spec is a comma-separated list of lm-eval task (or group) names and local
task directories; a directory is lm-eval's `include_path` (its YAML task configs), and
every task it defines is run, so tests and private benchmarks need no hub.
"""

from __future__ import annotations

import functools
import gc
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.perplexity import check_causal_lm, read_model_config

__all__ = [
    "HarnessError",
    "TaskResult",
    "TaskSpec",
    "evaluate_tasks",
    "format_task_table",
    "parse_tasks",
    "task_results_json",
]


class HarnessError(Moe2DenseError, ValueError):
    """lm-eval is missing, a task is unknown, or a task directory defines none."""


@dataclass(frozen=True)
class TaskSpec:
    names: tuple[str, ...]  # lm-eval task or group names, in the order given
    include_paths: tuple[str, ...]  # local task directories
    include_defaults: bool = True  # lm-eval's own tasks are needed (a name not from a directory)


@dataclass
class TaskResult:
    """One model's scores: task -> metric -> {"value", "stderr"} (stderr None where lm-eval has none)."""

    model: str
    scores: dict[str, dict[str, dict[str, float | None]]]

    def to_dict(self) -> dict:
        return asdict(self)


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError(
            "--tasks needs lm-evaluation-harness: pip install 'mergekit-moe2dense[eval]' (or lm-eval)"
        ) from None
    return lm_eval, TaskManager


def parse_tasks(spec: str | list[str]) -> TaskSpec:
    """Task names and local task directories from `--tasks` (comma-separated, repeatable).

    A directory stands for every task its YAML configs define; an unknown name, a
    directory without tasks, or a task whose data cannot be loaded is refused before
    any model is loaded. lm-eval's own task index (some 15k configs, seconds to read)
    is read only when a name is not from a directory.
    """
    items = [item.strip() for part in ([spec] if isinstance(spec, str) else spec) for item in part.split(",")]
    items = [item for item in items if item]
    if not items:
        raise HarnessError("--tasks: no task given")
    names, paths, hub_names = [], [], []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            local = _task_manager((str(path.resolve()),), False).all_tasks
            if not local:
                raise HarnessError(f"--tasks {item}: directory defines no lm-eval task (no task YAML)")
            paths.append(str(path.resolve()))
            names += [name for name in local if name not in names]
        elif os.sep in item or item.startswith("."):
            raise HarnessError(f"--tasks {item}: no such directory")
        elif item not in names:
            names.append(item)
            hub_names.append(item)
    spec = TaskSpec(tuple(names), tuple(paths), include_defaults=bool(hub_names))
    manager = _task_manager(spec.include_paths, spec.include_defaults)
    known = set(manager.all_tasks)
    unknown = [name for name in hub_names if name not in known]
    if unknown:
        raise HarnessError(
            f"--tasks: unknown lm-eval task {', '.join(unknown)} (see `lm_eval ls tasks`, or give a task directory)"
        )
    _load_task_data(spec.names, manager)
    return spec


def _load_task_data(names: tuple[str, ...], manager) -> None:
    """Builds each task once, loading its data: lm-eval does it only after loading a model, and
    data that cannot be had (a download offline) is refused here, naming its task. The runs
    then read the data from the datasets cache."""
    for name in names:
        try:
            manager.load([name])
        except OSError as error:  # datasets' and huggingface_hub's connection and not-found errors
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise HarnessError(
                f"--tasks {name}: the task's data cannot be loaded ({reason}); it must be available locally: "
                "download it once with network access (into the HF_DATASETS cache), or give a local task "
                "directory whose YAML points at local files"
            ) from None


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    _, TaskManager = _lm_eval()
    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def evaluate_tasks(
    models: list[str],
    tasks: TaskSpec,
    *,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "auto",
    limit: int | None = None,
    num_fewshot: int | None = None,
) -> list[TaskResult]:
    """Run lm-eval on every model directory, one at a time (each freed before the next)."""
    lm_eval, _ = _lm_eval()
    for model in models:  # every model before the first runs
        check_causal_lm(read_model_config(model), str(model))
    manager = _task_manager(tasks.include_paths, tasks.include_defaults)
    results = []
    for model in models:
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model), "dtype": dtype},
            tasks=list(tasks.names),
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
        )
        results.append(TaskResult(str(model), _scores(output["results"])))
        del output
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _scores(results: dict) -> dict[str, dict[str, dict[str, float | None]]]:
    """lm-eval's {"task": {"acc,none": v, "acc_stderr,none": s, "alias": ...}} as task -> metric -> value, stderr."""
    scores = {}
    for task, entries in results.items():
        metrics = {}
        for key, value in entries.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            name = metric if filt == "none" else f"{metric} ({filt})"
            stderr = entries.get(f"{metric}_stderr,{filt}")
            metrics[name] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            }
        scores[task] = metrics
    return scores


def format_task_table(results: list[TaskResult], reference: str | None = None) -> str:
    """task, metric, each model's value (± stderr), then each other model's difference to `reference`."""
    if not results:
        return ""
    ref = next((r for r in results if r.model == (reference or results[0].model)), None)
    if ref is None:
        raise HarnessError(f"reference {reference!r} is not among the evaluated models")
    others = [r for r in results if r is not ref]
    header = ["task", "metric", *(r.model for r in results), *(f"delta {r.model}" for r in others)]
    rows = [header]
    tasks = list(dict.fromkeys(t for r in results for t in r.scores))
    for task in tasks:
        metrics = list(dict.fromkeys(m for r in results for m in r.scores.get(task, {})))
        for metric in metrics:
            cells = [_value(r.scores.get(task, {}).get(metric)) for r in results]
            base = ref.scores.get(task, {}).get(metric)
            deltas = [_delta(r.scores.get(task, {}).get(metric), base) for r in others]
            rows.append([task, metric, *cells, *deltas])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            [row[0].ljust(widths[0]), row[1].ljust(widths[1]), *(c.rjust(w) for c, w in zip(row[2:], widths[2:]))]
        )
        for row in rows
    )


def task_results_json(results: list[TaskResult]) -> list[dict]:
    return [r.to_dict() for r in results]


def _value(score) -> str:
    if score is None:
        return "-"
    stderr = score["stderr"]
    return f"{score['value']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None and math.isfinite(stderr) else "")


def _delta(score, base) -> str:
    if score is None or base is None:
        return "-"
    return f"{score['value'] - base['value']:+.4f}"
