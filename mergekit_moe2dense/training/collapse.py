# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`collapse`: train the MoE with its experts pulled together until they are identical,
then convert it with `expert_uniform` (exact once the experts are identical, for families
whose top-k weights sum to one).

    collapse(CollapseSettings(moe=moe, data=path, training=TrainSettings(max_tokens=...)), out)

The objective is the LM loss (or, with `lm_weight` < 1, KD from the original MoE) plus

    lambda(t) * sum_layers sum_e ||W_e - mean_e W_e||^2      (W: every expert's gate, up, down)

with lambda rising over the run (`schedule`: `linear` 0 -> `penalty_max`, `exponential`
1e-4 x `penalty_max` -> `penalty_max`, `constant`). The penalty is applied as its proximal
step after each optimiser step, decoupled from Adam as AdamW decouples weight decay:
W_e - mean <- (W_e - mean) / (1 + 2 * lr * lambda(t)) with the peak learning rate `lr`.
Inside Adam the penalty's gradient would be normalised away (a large lambda moves weights no
faster than a small one), and the cosine schedule's learning rate, near zero at the end,
would switch it off just when it must be strongest. The mean of the experts is what the
step keeps, so the dense model the conversion writes is exactly the collapsed MoE's experts.

Exact only if the experts did collapse: the relative spread left after training must be at
most `SPREAD_TOLERANCE`, else the run is refused (or, with `allow_inexact`, recorded as not
exact). The trainer's state and the trained MoE live in `OUT.collapse-PID` beside OUT
(`output_dir.OutputDirectory.working_directory`) and are removed when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass

import torch
import transformers
from transformers import TrainerCallback, default_data_collator

from mergekit_moe2dense.data import load_documents
from mergekit_moe2dense.devices import check_device
from mergekit_moe2dense.families import get_family
from mergekit_moe2dense.output_dir import COLLAPSE_INFIX, OutputDirectory
from mergekit_moe2dense.perplexity import check_seq_len
from mergekit_moe2dense.training.inputs import (
    check_causal_lm,
    check_weights,
    check_work_dir,
    load_tokenizer,
    model_config,
    stored_dtype,
    training_sequences,
)
from mergekit_moe2dense.training.settings import SCHEDULES, CollapseSettings, HealError
from mergekit_moe2dense.training.trainer import DistillTrainer, SequenceDataset, training_arguments

__all__ = [
    "COLLAPSE_RECORD",
    "SCHEDULES",
    "SPREAD_TOLERANCE",
    "CollapsePenalty",
    "CollapseResult",
    "collapse",
    "expert_deviation",
]

COLLAPSE_RECORD = "collapse.json"
# The relative spread sum_e ||W_e - mean||^2 / sum_e ||W_e||^2 at or below which the experts count
# as collapsed and the conversion as exact: an RMS difference from their mean of 3e-5 of the
# weights' scale, far below the rounding of 16-bit weights (2^-9 relative for bfloat16, 2^-12 for
# float16) and, in float32, between a matmul's typical and worst-case rounding over a few
# thousand inputs (sqrt(K) and K epsilons). The proximal step gets well below it (1e-10 to 1e-14
# on the benchmark testbeds at --penalty-max 1e4, 5e-14 on the tests' model); a penalty too weak
# to collapse the experts leaves them orders of magnitude above (1e-3 and more).
SPREAD_TOLERANCE = 1e-9


@dataclass
class CollapseResult:
    """What a collapse did: its steps and tokens, the experts' spread at the end, where the
    collapsed MoE went (`save_moe`), and its record (`collapse.json`)."""

    out_path: str
    steps: int
    tokens: int
    deviation: float  # sum_e ||W_e - mean||^2 / sum_e ||W_e||^2 at the end, over all layers
    moe_path: str | None
    record: dict


def expert_tensors(model, family, config) -> list[torch.Tensor]:
    """The fused expert parameters [E, ...] of every MoE layer (gate_up_proj, down_proj)."""
    tensors = []
    for layer in family.moe_layer_indices(config):
        experts = model.get_submodule(family.experts_module(layer))
        tensors += [experts.gate_up_proj, experts.down_proj]
    return tensors


@torch.no_grad()
def expert_deviation(tensors: list[torch.Tensor]) -> tuple[float, float]:
    """(sum_e ||W_e - mean||^2, the same relative to sum_e ||W_e||^2), over `tensors`."""
    spread = sum(((w - w.mean(0, keepdim=True)) ** 2).sum().item() for w in tensors)
    norm = sum((w**2).sum().item() for w in tensors)
    return spread, spread / norm if norm else 0.0


class CollapsePenalty(TrainerCallback):
    """The penalty's proximal step after every optimiser step (module docstring)."""

    def __init__(self, tensors: list[torch.Tensor], *, penalty_max: float, schedule: str, steps: int, lr: float):
        self.tensors, self.penalty_max, self.schedule, self.steps, self.lr = tensors, penalty_max, schedule, steps, lr
        self.current = 0.0

    def strength(self, step: int) -> float:
        """lambda at optimiser step `step` (1-based)."""
        fraction = min(1.0, step / self.steps)
        if self.schedule == "linear":
            return self.penalty_max * fraction
        if self.schedule == "exponential":
            return self.penalty_max * 10 ** (-4 * (1 - fraction))
        return self.penalty_max

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.current = self.strength(state.global_step + 1)
        shrink = 1 / (1 + 2 * self.lr * self.current)
        with torch.no_grad():
            for w in self.tensors:
                mean = w.mean(0, keepdim=True)
                w.sub_(mean).mul_(shrink).add_(mean)

    def logs(self) -> dict[str, float]:
        spread, relative = expert_deviation(self.tensors)
        return {"lambda": self.current, "penalty": self.current * spread, "expert_spread": relative}


def collapse(
    settings: CollapseSettings,
    out_path: str,
    *,
    overwrite: bool = False,
    callbacks: list | None = None,
    progress: bool = True,
) -> CollapseResult:
    """Collapse `settings.moe`'s experts by training, convert it, write the dense model to
    `out_path` (and the collapsed MoE to `settings.save_moe`, if given). Experts left further
    apart than `SPREAD_TOLERANCE` are refused (the trained MoE still goes to `save_moe`), unless
    `allow_inexact`: then the dense model is written and recorded as not exact."""
    check_device(settings.training.device)  # before any model is loaded, never silently the CPU
    config, family, tokenizer = _check_moe(settings)
    out, moe_out = _check_outputs(settings, out_path, overwrite)
    documents = load_documents(settings.data)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise HealError("collapse runs in one process (it converts the model right after training); drop torchrun")
    training = settings.training
    steps = training.steps()
    sequences = training_sequences(
        documents, tokenizer, seq_len=training.seq_len, count=steps * training.batch_size, seed=training.seed,
        label=settings.data,
    )  # fmt: skip
    with out, moe_out if moe_out is not None else contextlib.nullcontext():
        work = out.working_directory(COLLAPSE_INFIX)
        model = transformers.AutoModelForCausalLM.from_pretrained(settings.moe, dtype=torch.float32)
        tensors = expert_tensors(model, family, config)
        start_spread = expert_deviation(tensors)[1]
        trainer, metrics = _train(settings, model, tensors, sequences, steps, work, callbacks, progress)
        spread = expert_deviation(tensors)[1]
        is_collapsed = spread <= SPREAD_TOLERANCE  # False for NaN
        refused = not is_collapsed and not settings.allow_inexact
        collapsed = moe_out.staging if moe_out is not None else os.path.join(work, "moe")
        if not refused or moe_out is not None:
            model.to(stored_dtype(config)).save_pretrained(collapsed)
            tokenizer.save_pretrained(collapsed)
        if refused:
            if moe_out is not None:
                moe_out.publish()  # what the training made, where asked: a later collapse can start from it
            raise HealError(_refusal(spread, start_spread, settings.penalty_max, settings.save_moe))
        _convert(settings, family.needs_statistics(config), collapsed, out.staging)
        exact = is_collapsed and family.renormalizes(config)
        record = _record(settings, steps, trainer, metrics, (start_spread, spread), exact)
        with open(os.path.join(out.staging, COLLAPSE_RECORD), "w", encoding="utf-8") as handle:
            json.dump(_strict_json(record), handle, indent=2, allow_nan=False)
        _add_card_section(out.staging, record)
        if moe_out is not None:
            moe_out.publish()
        out.publish()
    return CollapseResult(out.path, steps, record["tokens"], spread, settings.save_moe, record)


def _check_moe(settings: CollapseSettings):
    """The MoE as collapse needs it, from its config, tokenizer and shards alone: a causal LM
    MoE of a family the conversion supports, windows of `--seq-len` within its positions,
    every shard whole. Returns its config, family and tokenizer."""
    moe = settings.moe
    config = model_config(moe, "MoE")
    check_causal_lm(config, moe, "MoE", dense=False)
    family = get_family(config)  # an MoE the conversion supports, or one line
    tokenizer = load_tokenizer(moe, "MoE")
    check_seq_len(config, settings.training.seq_len, moe)
    check_weights(moe, "MoE")
    return config, family, tokenizer


def _check_outputs(settings: CollapseSettings, out_path: str, overwrite: bool):
    """OUT and the `save_moe` directory (neither an input, nor each other), both checked."""
    inputs = {"the MoE": settings.moe, "the data": settings.data}
    out = OutputDirectory(out_path, overwrite=overwrite, inputs=inputs)
    moe_out = None
    if settings.save_moe:
        check_work_dir(settings.save_moe, "--save-moe directory", inputs, out_path)  # nor OUT, existing or not
        moe_out = OutputDirectory(settings.save_moe, overwrite=overwrite, inputs=inputs)
        moe_out.check()
    out.check()
    return out, moe_out


def _train(settings: CollapseSettings, model, tensors, sequences, steps: int, work: str, callbacks, progress: bool):
    """Trains `model` with the penalty's proximal step on `tensors` (the trainer's state in
    `work`); returns the trainer and its metrics."""
    training = settings.training
    penalty = CollapsePenalty(
        tensors, penalty_max=settings.penalty_max, schedule=settings.schedule, steps=steps, lr=training.lr
    )
    teacher = None
    if training.lm_weight < 1:
        teacher = transformers.AutoModelForCausalLM.from_pretrained(settings.moe, dtype=training.torch_dtype)
    trainer = DistillTrainer(
        model=model,
        args=training_arguments(training, os.path.join(work, "trainer"), steps, progress),
        train_dataset=SequenceDataset(sequences),
        data_collator=default_data_collator,
        teacher=teacher,
        temperature=training.temperature,
        lm_weight=training.lm_weight,
        callbacks=[penalty, *(callbacks or [])],
        extra_logs=penalty.logs,
    )
    if not progress:  # nor the printed log lines that replace the bar
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    metrics = trainer.train().metrics
    del teacher, trainer.teacher
    return trainer, metrics


def _convert(settings: CollapseSettings, needs_statistics: bool, collapsed: str, staging: str) -> None:
    """The collapsed MoE converted with expert_uniform into `staging`; a family that needs router
    statistics (the calibrated mixture weight of un-normalised top-k) calibrates on the data."""
    from mergekit_moe2dense.build import build_dense
    from mergekit_moe2dense.config import Moe2DenseConfig

    training = settings.training
    conversion = {"merge_method": "expert_uniform", "models": [{"model": collapsed}], "parameters": {}}
    if needs_statistics:
        conversion["calibration"] = {
            "dataset": settings.data, "num_samples": 32, "seq_len": training.seq_len,
            "batch_size": training.batch_size,
        }  # fmt: skip
    build_dense(Moe2DenseConfig.model_validate(conversion), staging)


def _record(settings: CollapseSettings, steps: int, trainer, metrics: dict, spreads: tuple, exact: bool) -> dict:
    """`collapse.json`: the inputs, the run, the expert spread (before, after) and its verdict."""
    before, after = spreads
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "moe": settings.moe,
        "data": settings.data,
        "steps": steps,
        "tokens": steps * settings.training.batch_size * settings.training.seq_len,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": metrics.get("train_loss"),
        "train_seconds": metrics.get("train_runtime"),
        "penalty_max": settings.penalty_max,
        "schedule": settings.schedule,
        "expert_spread_before": before,
        "expert_spread_after": after,
        "spread_tolerance": SPREAD_TOLERANCE,
        "collapsed": after <= SPREAD_TOLERANCE,
        "exact": exact,
        "settings": settings.training.model_dump(),
        "collapsed_moe": settings.save_moe,
    }


def _refusal(spread: float, before: float, penalty_max: float, save_moe: str | None) -> str:
    kept = f"; the trained MoE is in {save_moe}" if save_moe else ""
    return (
        f"the experts did not collapse: relative spread {spread:.3g} after training ({before:.3g} before), above "
        f"{SPREAD_TOLERANCE:.2g}, the tolerance for an exact conversion; raise --penalty-max (was {penalty_max:g}) "
        f"or --max-tokens, or pass --allow-inexact to write the approximate dense model{kept}"
    )


def _strict_json(value):
    """JSON has no Infinity or NaN (e.g. --penalty-max inf, a diverged loss): they become the
    strings "Infinity", "-Infinity" and "NaN", which every JSON parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return json.dumps(value)
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(item) for item in value]
    return value


def _exactness(record: dict) -> str:
    """What the card says of the dense model against the trained MoE."""
    tolerance = f"the tolerance {record['spread_tolerance']:.2g} for an exact conversion"
    if not record["collapsed"]:
        return (
            f"**Not exact**: the spread is above {tolerance} (written with `--allow-inexact`); this dense "
            "model only approximates the trained MoE."
        )
    if not record["exact"]:
        return (
            f"The experts collapsed (spread within {tolerance}), but this family does not renormalise its "
            "top-k weights: the dense model's mixture weight is calibrated, so it is not exact."
        )
    return (
        f"The experts collapsed (spread within {tolerance}): this dense model computes what the trained MoE "
        "does, to float precision."
    )


def _add_card_section(out_dir: str, record: dict) -> None:
    """The conversion's card, preceded by how the experts were collapsed."""
    path = os.path.join(out_dir, "README.md")
    with open(path, encoding="utf-8") as handle:
        card = handle.read()
    settings = record["settings"]
    loss = (
        "the LM loss"
        if settings["lm_weight"] == 1
        else f"{settings['lm_weight']} x LM + (1 - that) x KD from the original MoE"
    )
    section = f"""
## Collapse

Before the conversion, `{record["moe"]}` was trained with `mergekit-moe2dense collapse` on {record["tokens"]}
tokens of `{record["data"]}` ({record["steps"]} steps, lr {settings["lr"]}): {loss} plus lambda(t) x
sum_e ||W_e - mean W||^2 over the experts, lambda rising ({record["schedule"]}) to {record["penalty_max"]}.
Relative expert spread sum_e ||W_e - mean||^2 / sum_e ||W_e||^2: {record["expert_spread_before"]:.3g} before,
{record["expert_spread_after"]:.3g} after; final loss {record["final_loss"]}. Record: `{COLLAPSE_RECORD}`.
{_exactness(record)}
"""
    marker = "\n## Per-layer expert weights"
    card = card.replace(marker, section + marker, 1) if marker in card else card + section
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(card)
