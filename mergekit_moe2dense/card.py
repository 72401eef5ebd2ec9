# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The model card (README.md) of a converted model: what made it (method, parameters,
calibration data, the config) and what was measured while making it (`CardTable`s)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CardTable", "calibration_summary", "write_heal_card", "write_model_card", "write_moe_card"]


@dataclass(frozen=True)
class CardTable:
    """A measured figure for the card: a titled table and a sentence saying what it shows."""

    title: str
    note: str
    columns: tuple[str, ...]
    rows: tuple[tuple, ...]

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", self.note, "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|---" * len(self.columns) + "|")
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)


def refit_table(errors: dict[int, tuple[float, float]]) -> CardTable:
    """The re-fit's per-layer errors (calibration/sequential.py), before and after the fit."""
    return CardTable(
        "Re-fit",
        "Relative squared error sum_t ||y_t - dense(x_t)||^2 / sum_t ||y_t||^2 of each layer's dense MLP against "
        "the MoE block's output y on the calibration tokens (inputs from the already converted layers), before "
        "and after the least-squares re-fit.",
        ("layer", "before", "after"),
        tuple((index, before, after) for index, (before, after) in sorted(errors.items())),
    )


def calibration_summary(job, stats) -> dict[str, Any] | None:
    """What the statistics were computed on (None: the method used none); `job` a
    `job.ConversionJob` (its config's calibration block, its --stats file)."""
    if stats is None:
        return None
    calibration = stats.metadata.get("calibration") or {}
    if not calibration and job.config.calibration is not None:
        calibration = job.config.calibration.model_dump(mode="json")
    return {
        "dataset": calibration.get("dataset", "unknown"),
        "num_samples": calibration.get("num_samples"),
        "seq_len": calibration.get("seq_len"),
        "tokens": stats.tokens,
        "reused": os.path.basename(job.stats_path) if job.stats_path else None,
    }


def write_model_card(
    out_dir: str,
    context,
    weights: torch.Tensor,
    extra: dict[str, Any] | None = None,
    *,
    calibration: dict[str, Any] | None = None,
    tables: tuple[CardTable, ...] = (),
) -> None:
    """Card of one dense model (`context` an `outputs.WriteContext`); `extra` adds lines (e.g. a cluster's
    share), `calibration` is `calibration_summary`'s, `tables` what was measured."""
    config, method, layers = context.config, context.method, context.layers
    rows = "\n".join(
        f"| {layer.index} | " + " | ".join(f"{w:.4f}" for w in row) + " |"
        for layer, row in zip(layers, weights.tolist())
    )
    experts = weights.shape[1]
    header = "| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " |"
    rule = "|---" * (experts + 1) + "|"
    extra_text = "\n".join(f"- {key}: `{value}`" for key, value in (extra or {}).items())
    extra_text = f"\n\n{extra_text}" if extra_text else ""
    body = f"""A dense model made from the Mixture-of-Experts model `{config.model}` with
mergekit-moe2dense, a plugin for [mergekit](https://github.com/arcee-ai/mergekit): every MoE layer's experts
were merged into one MLP with the **{method.pretty_name}** method (`{method.name}`).
Everything outside the MoE blocks is copied unchanged.{extra_text}

{_method_section(method, context.params)}

{_calibration_section(calibration)}

## Per-layer expert weights

{header}
{rule}
{rows}{_measured_section(tables)}"""
    _write_card(out_dir, config, "merge", body, context.config_source)


def write_moe_card(out_dir: str, context, shares, *, calibration: dict[str, Any] | None = None) -> None:
    """Card of an MoE rebuilt from k merged MLPs; the weights are in expert_weights.json."""
    config, method, params = context.config, context.method, context.params
    rows = "\n".join(f"| {j} | {share:.4f} |" for j, share in enumerate(shares))
    router = (
        "by a fitted logistic regression" if params.router == "fitted" else "in closed form from the clusters' weights"
    )
    body = f"""A Mixture-of-Experts model with {len(shares)} experts per layer made from `{config.model}` with
mergekit-moe2dense, a plugin for [mergekit](https://github.com/arcee-ai/mergekit): calibration tokens were clustered by
their router vectors with the **{method.pretty_name}** method (`{method.name}`); expert j of every layer
merges the original experts with cluster j's weights (`expert_weights.json`), and the router was set {router}.
Everything outside the MoE blocks is copied unchanged.

{_method_section(method, params)}

{_calibration_section(calibration)}

## Experts

| expert | token share |
|---|---|
{rows}"""
    _write_card(out_dir, config, "moe", body, context.config_source)


def write_smaller_moe_card(out_dir: str, context, experts) -> None:
    """Card of a smaller MoE (`prune_experts`, `merge_experts`): which old experts make each new one
    (`experts` a `plan.ExpertGroups`); the merge weights are in expert_weights.json."""
    config, method = context.config, context.method
    rows = "\n".join(
        f"| {layer.index} | " + " | ".join("+".join(map(str, group)) for group in groups) + " |"
        for layer, groups in zip(context.layers, experts.groups)
    )
    count = experts.num_experts
    header = "| layer | " + " | ".join(f"expert {j}" for j in range(count)) + " |"
    rule = "|---" * (count + 1) + "|"
    body = f"""A Mixture-of-Experts model with {count} routed experts per MoE layer made from `{config.model}` with
mergekit-moe2dense, a plugin for [mergekit](https://github.com/arcee-ai/mergekit), by the **{method.pretty_name}** method
(`{method.name}`), parameters {_parameters(context.params)}. Each new expert is one kept expert or the saliency-weighted
merge of a group of the original experts (most salient first); its router row is the same mix of theirs.
Shared experts and everything outside the MoE blocks are copied unchanged.

## Original experts behind each new expert

{header}
{rule}
{rows}"""
    _write_card(out_dir, config, "moe", body, context.config_source)


def write_heal_card(out_dir: str, record: dict, record_file: str) -> None:
    """README.md of a healed model (`record` its `record_file`, heal.json): what taught it, on how
    many tokens, with what settings. Inputs are named by their last path component: a card is
    published, the paths on this machine are not (the record keeps them whole)."""
    settings = record["settings"]
    name = os.path.basename(os.path.normpath(out_dir)).split(".incomplete-")[0]
    ppl = ""
    if record.get("perplexity_before") is not None:
        ppl = (
            f"\nHeld-out perplexity on `{_input_name(record['eval_data'])}` (seq_len {settings['seq_len']}): "
            f"{record['perplexity_before']:.3f} before, {record['perplexity_after']:.3f} after.\n"
        )
    method = (
        f"LoRA of rank {record['lora_rank']} (merged into the weights)" if record["lora_rank"] else "full fine-tuning"
    )
    loss = (
        "forward KL"
        if settings["lm_weight"] == 0
        else f"(1 - {settings['lm_weight']}) x forward KL + {settings['lm_weight']} x LM loss"
    )
    cache = f", from a top-{record['teacher_top_k']} teacher cache" if record["teacher_cache"] else ""
    resumed = record.get("steps_from_checkpoint")
    resumed = f", the first {resumed} before resuming from a checkpoint" if resumed else ""
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in settings.items() if key != "extra")
    text = f"""---
library_name: transformers
tags:
- mergekit
- moe2dense
- heal
- distillation
---
# {name}

The dense model `{_input_name(record["student"])}` healed by distillation from the Mixture-of-Experts model
`{_input_name(record["teacher"])}` with `mergekit-moe2dense heal`: {loss} between the teacher's and the student's
next-token distributions (temperature {settings["temperature"]}{cache}), {method}, on
{record["tokens"]} tokens of `{_input_name(record["data"])}` ({record["steps"]} steps{resumed}; final loss {record["final_loss"]}).
{ppl}
## Settings

| setting | value |
|---|---|
{rows}

The full record is in `{record_file}`.
"""
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(text)


def _input_name(path: str) -> str:
    """A local input by its last path component (absolute in the records); a Hub name as it is."""
    return os.path.basename(os.path.normpath(path)) if os.path.isabs(path) else path


def _parameters(params) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in params.model_dump(mode="json").items()) or "none"


def _method_section(method, params) -> str:
    values = params.model_dump(mode="json")
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in values.items())
    table = f"| parameter | value |\n|---|---|\n{rows}" if values else "No parameters."
    return f"## Method\n\n`{method.name}` ({method.pretty_name}).\n\n{table}"


def _calibration_section(calibration: dict[str, Any] | None) -> str:
    if calibration is None:
        return "## Calibration\n\nNone: the expert weights come from the method and the weights alone."
    reused = calibration["reused"]
    where = f"reused from an earlier run (`--stats`, `{reused}`)" if reused else "computed in this run"
    return f"""## Calibration

Router statistics {where}:

| dataset | samples | seq_len | tokens |
|---|---|---|---|
| `{calibration["dataset"]}` | {_cell(calibration["num_samples"])} | {_cell(calibration["seq_len"])} | {calibration["tokens"]} |"""


def _measured_section(tables: tuple[CardTable, ...]) -> str:
    if not tables:
        return ""
    return "\n\n## Measured\n\n" + "\n\n".join(table.markdown() for table in tables)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_card(out_dir: str, config, tag: str, body: str, config_source: str | None) -> None:
    """Front matter, title (the output's name), `body`, and the config that made it."""
    yaml_text = config_source if config_source is not None else config.to_yaml()
    name = os.path.basename(os.path.normpath(out_dir)).split(".incomplete-")[0]
    # A Hub id only: a local path is no base model to a Hub page or a GGUF's metadata.
    local = os.path.exists(os.path.expanduser(config.model.model.path))
    base_model = "" if local else f"base_model: {config.model}\n"
    text = f"""---
library_name: transformers
tags:
- mergekit
- moe2dense
- {tag}
{base_model}---
# {name}

{body}

## Configuration

```yaml
{yaml_text.strip()}
```
"""
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
