# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The model card (README.md) of a converted model: what made it (method, parameters,
calibration data, the config, the tool's version) and what was measured while making it
(`CardTable`s), and the evaluation results `eval --card` appends. A card is published: local
inputs are named by their last path component, never by a path on this machine."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from mergekit_moe2dense.report_files import write_report_text

__all__ = [
    "CardTable",
    "append_evaluation",
    "calibration_summary",
    "conversion_lineage",
    "published_name",
    "tool_version",
    "write_heal_card",
    "write_model_card",
    "write_moe_card",
    "write_smaller_moe_card",
]

PACKAGE = "mergekit-moe2dense"
CARD_FILE = "README.md"
WEIGHTS_FILE = "expert_weights.json"  # as outputs/base.py writes it beside the card


def tool_version() -> str:
    """The installed version of mergekit-moe2dense ("unknown" from a source tree not installed)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def published_name(path: str) -> str:
    """A local input (a path, absolute or relative, that exists here) by its last path
    component; a Hub name as it is."""
    local = os.path.isabs(path) or os.path.exists(os.path.expanduser(path))
    return os.path.basename(os.path.normpath(os.path.expanduser(path))) if local else path


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
    body = f"""A dense model made from the Mixture-of-Experts model `{_model_name(config)}` with
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
    body = f"""A Mixture-of-Experts model with {len(shares)} experts per layer made from `{_model_name(config)}` with
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
    """Card of a smaller MoE (`experts` a `plan.ExpertGroups`): a pruned one (every new expert one
    kept expert) lists the experts kept per layer; a merged one which old experts make each new one.
    The merge weights are in expert_weights.json."""
    config, method = context.config, context.method
    count = experts.num_experts
    pruned = all(len(group) == 1 for groups in experts.groups for group in groups)
    if pruned:
        rows = "\n".join(
            f"| {layer.index} | " + ", ".join(str(group[0]) for group in groups) + " |"
            for layer, groups in zip(context.layers, experts.groups)
        )
        table = f"## Experts kept per layer\n\n| layer | kept experts |\n|---|---|\n{rows}"
        kept = (
            "copied unchanged"
            if context.params.refit == "none"
            else "copied, their down projections re-fitted so that each block's output matches the original "
            "block's on the calibration tokens (`refit: down_proj`)"
        )
        how = (
            f"{count} of the routed experts of every MoE layer were kept and the others removed, with their "
            f"router rows; the kept experts are {kept}."
        )
    else:
        rows = "\n".join(
            f"| {layer.index} | " + " | ".join("+".join(map(str, group)) for group in groups) + " |"
            for layer, groups in zip(context.layers, experts.groups)
        )
        header = "| layer | " + " | ".join(f"expert {j}" for j in range(count)) + " |"
        table = f"## Original experts behind each new expert\n\n{header}\n{'|---' * (count + 1)}|\n{rows}"
        how = (
            "Each new expert is one kept expert or the saliency-weighted merge of a group of the original experts "
            "(most salient first); its router row is the same mix of theirs."
        )
    body = f"""A Mixture-of-Experts model with {count} routed experts per MoE layer made from `{_model_name(config)}` with
mergekit-moe2dense, a plugin for [mergekit](https://github.com/arcee-ai/mergekit), by the **{method.pretty_name}** method
(`{method.name}`), parameters {_parameters(context.params)}. {how}
Shared experts and everything outside the MoE blocks are copied unchanged.

{table}"""
    _write_card(out_dir, config, "moe", body, context.config_source)


def write_heal_card(out_dir: str, record: dict, record_file: str, lineage: dict | None = None) -> None:
    """README.md of a healed model (`record` its `record_file`, heal.json): what taught it, on how
    many tokens, with what settings; after the conversion that made the student, when `lineage`
    (`conversion_lineage` of the student) is known. Inputs are named by their last path
    component: a card is published, the paths on this machine are not (the record keeps them whole)."""
    settings = record["settings"]
    name = os.path.basename(os.path.normpath(out_dir)).split(".incomplete-")[0]
    text = f"""---
library_name: transformers
tags:
- mergekit
- moe2dense
- heal
- distillation
---
# {name}

{_made_with()}

{_heal_paragraph(record)}{_lineage_section(lineage)}
## Settings

| setting | value |
|---|---|
{chr(10).join(f"| {key} | `{_cell(value)}` |" for key, value in settings.items() if key != "extra")}

The full record is in `{record_file}`.
"""
    with open(os.path.join(out_dir, CARD_FILE), "w", encoding="utf-8") as handle:
        handle.write(text)


def _heal_paragraph(record: dict) -> str:
    """What the heal did, in one paragraph, its figures rounded."""
    settings = record["settings"]
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
    if record.get("hidden_weight"):
        loss += f" + {record['hidden_weight']} x the per-layer hidden-state loss"
    cache = f", from a top-{record['teacher_top_k']} teacher cache" if record["teacher_cache"] else ""
    resumed = record.get("steps_from_checkpoint")
    resumed = f", the first {resumed} before resuming from a checkpoint" if resumed else ""
    return f"""The dense model `{_input_name(record["student"])}` healed by distillation from the Mixture-of-Experts model
`{_input_name(record["teacher"])}` with `mergekit-moe2dense heal`: {loss} between the teacher's and the student's
next-token distributions (temperature {settings["temperature"]}{cache}), {method}, on
{record["tokens"]} tokens of `{_input_name(record["data"])}` ({record["steps"]} steps{resumed}; final loss {_cell(record["final_loss"])}).
{ppl}"""


def conversion_lineage(model_dir: str) -> dict | None:
    """How a converted model was made, from its expert_weights.json and card: the source MoE's
    published name, the method, its parameters and the per-layer expert weights (None: not a
    model this tool converted)."""
    try:
        with open(os.path.join(model_dir, WEIGHTS_FILE), encoding="utf-8") as handle:
            weights = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(weights, dict) or "method" not in weights:
        return None
    return {
        "source": _card_source(model_dir),
        "method": weights["method"],
        "parameters": weights.get("parameters") or {},
        "layer_indices": weights.get("layer_indices") or [],
        "layers": weights.get("layers"),
    }


def _card_source(model_dir: str) -> str | None:
    """The source model named in the configuration block of a converted model's card."""
    try:
        with open(os.path.join(model_dir, CARD_FILE), encoding="utf-8") as handle:
            card = handle.read()
    except OSError:
        return None
    found = re.search(r"## Configuration\n\n```yaml\n(.*?)\n```", card, re.S)
    try:
        models = (yaml.safe_load(found.group(1)) or {}).get("models") if found else None
        model = models[0]["model"]
    except (yaml.YAMLError, AttributeError, LookupError, TypeError):
        return None
    return published_name(model if isinstance(model, str) else str(model.get("model", {}).get("path", "")))


def _lineage_section(lineage: dict | None) -> str:
    """The conversion before the heal: source MoE, method, parameters, expert weights."""
    if lineage is None:
        return ""
    source = f"`{lineage['source']}`" if lineage["source"] else "a Mixture-of-Experts model"
    parameters = ", ".join(f"`{k}={v}`" for k, v in lineage["parameters"].items()) or "none"
    text = (
        f"\n## Lineage\n\n1. The Mixture-of-Experts model {source}.\n"
        f"2. Converted to a dense model by mergekit-moe2dense with the `{lineage['method']}` method, "
        f"parameters {parameters}.\n3. Healed by distillation, as above.\n"
    )
    layers = lineage["layers"]
    if layers and isinstance(layers[0], list) and layers[0] and not isinstance(layers[0][0], list):
        experts = len(layers[0])
        indices = lineage["layer_indices"] or list(range(len(layers)))
        rows = "\n".join(
            f"| {index} | " + " | ".join(f"{w:.4f}" for w in row) + " |" for index, row in zip(indices, layers)
        )
        header = "| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " |"
        text += f"\n### Per-layer expert weights of the conversion\n\n{header}\n{'|---' * (experts + 1)}|\n{rows}\n"
    return text


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
| `{published_name(str(calibration["dataset"]))}` | {_cell(calibration["num_samples"])} | {_cell(calibration["seq_len"])} | {calibration["tokens"]} |"""


def _measured_section(tables: tuple[CardTable, ...]) -> str:
    if not tables:
        return ""
    return "\n\n## Measured\n\n" + "\n\n".join(table.markdown() for table in tables)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_card(out_dir: str, config, tag: str, body: str, config_source: str | None) -> None:
    """Front matter, title (the output's name), the tool's version, `body`, and the config that
    made it (local paths in it by their last component)."""
    yaml_text = _published_yaml(config_source if config_source is not None else config.to_yaml())
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

{_made_with()}

{body}

## Configuration

```yaml
{yaml_text.strip()}
```
"""
    with open(os.path.join(out_dir, CARD_FILE), "w", encoding="utf-8") as handle:
        handle.write(text)


def _made_with() -> str:
    return f"Made with mergekit-moe2dense {tool_version()}."


def _model_name(config) -> str:
    """The conversion's source model as a card names it (a LoRA on it after a `+`)."""
    model = config.model
    name = published_name(model.model.path)
    return f"{name}+{published_name(model.lora.path)}" if model.lora is not None else name


def _published_yaml(text: str) -> str:
    """The config's YAML text with every local path in its values replaced by its last
    component (comments and layout kept: the replacement is textual)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    paths = {value for value in _strings(data) if published_name(value) != value}
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, published_name(path))
    return text


def _strings(data) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        return [s for value in data.values() for s in _strings(value)]
    if isinstance(data, list):
        return [s for value in data for s in _strings(value)]
    return []


def append_evaluation(out_dir: str, records: list[dict] | str, reference: str | None = None) -> None:
    """Add the results of `eval` (its `--json` records, or the path of that file) to the card
    in `out_dir` as a `## Evaluation` section, each model by its published name."""
    if isinstance(records, (str, os.PathLike)):
        with open(records, encoding="utf-8") as handle:
            records = json.load(handle)
    path = os.path.join(out_dir, CARD_FILE)
    with open(path, encoding="utf-8") as handle:
        card = handle.read()
    # a later evaluation replaces the section an earlier one added; the card is rewritten whole
    start = card.find("\n## Evaluation\n")
    if start >= 0:
        end = card.find("\n## ", start + 1)
        card = card[:start] + (card[end:] if end >= 0 else "\n")
    write_report_text(path, card.rstrip("\n") + "\n\n" + evaluation_section(records, reference) + "\n")


def evaluation_section(records: list[dict], reference: str | None = None) -> str:
    """The `eval` records as a markdown table: perplexity and its ratio to the reference (the
    first model by default), and every benchmark score."""
    reference = reference or records[0]["model"]
    ref = next((r for r in records if r["model"] == reference), records[0])
    tasks = list(dict.fromkeys(task for r in records for task in (r.get("tasks") or {})))
    has_ppl = any("perplexity" in r for r in records)
    columns = ["model"] + (["tokens", "perplexity", "ratio"] if has_ppl else []) + tasks
    rows = []
    for r in records:
        row = [f"`{published_name(r['model'])}`"]
        if has_ppl:
            ratio = r["perplexity"] / ref["perplexity"] if "perplexity" in r and "perplexity" in ref else None
            row += [_cell(r.get("tokens")), _round(r.get("perplexity"), 3), _round(ratio, 4)]
        row += [_score(r.get("tasks", {}).get(task)) for task in tasks]
        rows.append(row)
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = f"Measured with `mergekit-moe2dense eval` {tool_version()}, against `{published_name(ref['model'])}`."
    return "## Evaluation\n\n" + note + "\n\n" + "\n".join(lines)


def _round(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _score(scores) -> str:
    """A task's main figure: its first metric's value, rounded (the JSON keeps them all)."""
    for metric, value in (scores or {}).items():
        value = value.get("value") if isinstance(value, dict) else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{value:.4f} ({metric})"
    return "-"
