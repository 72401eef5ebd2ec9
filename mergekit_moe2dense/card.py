# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The model card (README.md) of a converted model."""

from __future__ import annotations

import os
from typing import Any

import torch


def write_model_card(out_dir: str, job, weights: torch.Tensor, extra: dict[str, Any] | None = None) -> None:
    """Card of one dense model (`job` a `job.ConversionJob`); `extra` adds lines (e.g. a cluster's share)."""
    config, method, layers = job.config, job.method, job.layers
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
were merged into one MLP with the **{method.pretty_name}** method (`{method.name}`)
and parameters {_parameters(job.params)}. Everything outside the MoE blocks is copied unchanged.{extra_text}

## Per-layer expert weights

{header}
{rule}
{rows}"""
    _write_card(out_dir, config, "merge", body, job.config_source)


def write_moe_card(out_dir: str, job, shares) -> None:
    """Card of an MoE rebuilt from k merged MLPs; the weights are in expert_weights.json."""
    config, method, params = job.config, job.method, job.params
    rows = "\n".join(f"| {j} | {share:.4f} |" for j, share in enumerate(shares))
    router = (
        "by a fitted logistic regression" if params.router == "fitted" else "in closed form from the clusters' weights"
    )
    body = f"""A Mixture-of-Experts model with {len(shares)} experts per layer made from `{config.model}` with
mergekit-moe2dense, a plugin for [mergekit](https://github.com/arcee-ai/mergekit): calibration tokens were clustered by
their router vectors with the **{method.pretty_name}** method (`{method.name}`), parameters
{_parameters(params)}; expert j of every layer merges the original experts with cluster j's weights
(`expert_weights.json`), and the router was set {router}.
Everything outside the MoE blocks is copied unchanged.

## Experts

| expert | token share |
|---|---|
{rows}"""
    _write_card(out_dir, config, "moe", body, job.config_source)


def write_smaller_moe_card(out_dir: str, job, experts) -> None:
    """Card of a smaller MoE (`prune_experts`, `merge_experts`): which old experts make each new one
    (`experts` a `prune_experts.ExpertGroups`); the merge weights are in expert_weights.json."""
    config, method = job.config, job.method
    rows = "\n".join(
        f"| {layer.index} | " + " | ".join("+".join(map(str, group)) for group in groups) + " |"
        for layer, groups in zip(job.layers, experts.groups)
    )
    count = experts.num_experts
    header = "| layer | " + " | ".join(f"expert {j}" for j in range(count)) + " |"
    rule = "|---" * (count + 1) + "|"
    body = f"""A Mixture-of-Experts model with {count} routed experts per MoE layer made from `{config.model}` with
mergekit-moe2dense, a plugin for [mergekit](https://github.com/arcee-ai/mergekit), by the **{method.pretty_name}** method
(`{method.name}`), parameters {_parameters(job.params)}. Each new expert is one kept expert or the saliency-weighted
merge of a group of the original experts (most salient first); its router row is the same mix of theirs.
Shared experts and everything outside the MoE blocks are copied unchanged.

## Original experts behind each new expert

{header}
{rule}
{rows}"""
    _write_card(out_dir, config, "moe", body, job.config_source)


def _parameters(params) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in params.model_dump(mode="json").items()) or "none"


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
