# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`evaluate`: one or more causal LMs side by side, by perplexity (`perplexity.py`) on text and
by lm-evaluation-harness benchmarks (`harness.py`), from one `EvalSettings`.

Everything cheap is checked before the first model is scored: the report file (`json_path`,
never an input), the device, the benchmark names and their data, then every model (positions,
an LM head, the same tokens). The tables are formatted as soon as each part is scored, so a
`reference` that is not among the models fails before the report is written. The report ends
with a one-line verdict per model against the reference (`verdict_line`, the quickstart's), and
`card` adds the results to a converted model's card (card.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from pydantic import model_validator

from mergekit_moe2dense import harness, perplexity
from mergekit_moe2dense.card import CARD_FILE, append_evaluation
from mergekit_moe2dense.devices import check_device
from mergekit_moe2dense.perplexity import DEFAULT_SEQ_LEN, EvalResult, EvaluationError
from mergekit_moe2dense.report_files import check_reports, write_report_text
from mergekit_moe2dense.settings import PathName, Settings

__all__ = ["EvalReport", "EvalSettings", "evaluate", "verdict_line"]


class EvalSettings(Settings):
    """What `evaluate` scores, and how (the flags of `eval`).

    - `data`: text to score by perplexity (files, directories or datasets names).
    - `tasks`: lm-evaluation-harness tasks, each entry comma-separated task or group names and
      local task directories (needs the `[eval]` extra).
    - `seq_len`, `stride`, `batch_size`, `max_tokens`: the perplexity windows
      (`perplexity.PerplexitySettings`); `batch_size` is the benchmarks' too.
    - `limit`, `num_fewshot`: examples per task, and few-shot examples (default: each task's).
    - `device`; `reference`: the model the others are compared to (default: the first);
      `json_path`: where the results are written as JSON; `card`: a model directory whose
      README.md the results are added to.
    """

    error: ClassVar = EvaluationError

    data: tuple[PathName, ...] = ()
    tasks: tuple[str, ...] = ()
    seq_len: int = DEFAULT_SEQ_LEN
    stride: int | None = None
    batch_size: int = 4
    max_tokens: int | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    device: str = "cpu"
    reference: str | None = None
    json_path: PathName | None = None
    card: PathName | None = None

    @model_validator(mode="after")
    def _something_to_score(self) -> EvalSettings:
        if not self.data and not self.tasks:
            raise ValueError("eval needs --data (perplexity), --tasks (lm-eval benchmarks), or both")
        return self


@dataclass
class EvalReport:
    """What `evaluate` measured, per model: its perplexity (with `data`) and its benchmark
    scores (with `tasks`)."""

    perplexity: list[EvalResult] | None
    tasks: list[harness.TaskResult] | None
    records: list[dict]  # one per model, as `json_path` holds them
    table: str  # the tables as `eval` prints them, each model against the reference
    verdict: str | None = None  # one line per model against the reference (with `data`)


def verdict_line(moe_ppl: float, dense_ppl: float, subject: str = "the dense model at one expert's width") -> str:
    """How far a converted model's perplexity is from its MoE's, in one line: within 5% is close,
    within 20% usable, beyond that far. `eval` says `the model`: it scores dense models and smaller
    MoEs alike."""
    ratio = dense_ppl / moe_ppl
    change = 100 * (ratio - 1)
    quality = "close to the MoE" if ratio <= 1.05 else "usable" if ratio <= 1.2 else "far from the MoE"
    return f"verdict: {subject} has {change:+.1f}% perplexity vs the MoE (ratio {ratio:.3f}): {quality}"


def _verdicts(results: list[EvalResult], reference: str) -> str | None:
    """`verdict_line` of every model but the reference, each named when there are several."""
    ref = next(r for r in results if r.model == reference)
    others = [r for r in results if r is not ref]
    lines = [verdict_line(ref.perplexity, r.perplexity, subject="the model") for r in others]
    if len(others) > 1:
        lines = [f"{r.model}: {line}" for r, line in zip(others, lines)]
    return "\n".join(lines) or None


def _check_card(card: str | None) -> None:
    if card is not None and not os.path.isfile(os.path.join(card, CARD_FILE)):
        raise EvaluationError(f"--card {card}: no {CARD_FILE} there to add the results to (give a model directory)")


def evaluate(models: list[str], settings: EvalSettings, *, progress: bool = True) -> EvalReport:
    """Score every model of `models` (local model directories) as `settings` asks, one model at
    a time (`progress`: the perplexity's bars); the results are written to `settings.json_path`
    too, when given."""
    models = [os.fspath(model) for model in models]
    if not models:
        raise EvaluationError("eval needs at least one model")
    task_items = [item.strip() for spec in settings.tasks for item in spec.split(",")]
    inputs = [("model", m) for m in models] + [("--data", d) for d in settings.data]
    check_reports({"--json": settings.json_path}, inputs + [("--tasks", t) for t in task_items])  # before any model
    _check_card(settings.card)
    check_device(settings.device)
    reference = settings.reference or models[0]
    # lm-eval installed and every task known: before any model runs
    tasks = harness.parse_tasks(list(settings.tasks)) if settings.tasks else None
    records = [{"model": model} for model in models]
    tables, results, scored, verdict = [], None, None, None
    if settings.data:
        documents = [doc for path in settings.data for doc in perplexity.load_eval_documents(path)]
        results = perplexity.evaluate_models(
            models, documents, seq_len=settings.seq_len, stride=settings.stride, batch_size=settings.batch_size,
            max_tokens=settings.max_tokens, device=settings.device, progress=progress,
        )  # fmt: skip
        tables.append(perplexity.format_results_table(results, reference=reference))
        verdict = _verdicts(results, reference)
        records = [result.to_dict() for result in results]
    if tasks is not None:
        scored = harness.evaluate_tasks(
            models, tasks, batch_size=settings.batch_size, device=settings.device, limit=settings.limit,
            num_fewshot=settings.num_fewshot,
        )  # fmt: skip
        tables.append(harness.format_task_table(scored, reference=reference))
        for entry, result in zip(records, scored):
            entry["tasks"] = result.scores
    if settings.json_path:
        write_report_text(settings.json_path, json.dumps(records, indent=2) + "\n")
    if settings.card:
        append_evaluation(settings.card, records, reference)
    return EvalReport(results, scored, records, "\n\n".join(tables), verdict)
