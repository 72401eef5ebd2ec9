# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`heal`: distil the MoE (teacher) into a converted dense model (student).

    heal(student, out, teacher=moe, data=path, settings=TrainSettings(max_tokens=...))

Every cheap check runs first (settings, both models, their tokenizers and vocabularies,
sequence length, OUT, the data); then, with OUT locked: the optional teacher cache pass
(`teacher_cache.py`), the student's held-out perplexity, training (`training.DistillTrainer`,
full fine-tuning or LoRA through peft), the merge of the LoRA into the weights, the
perplexity after, and OUT written through `OutputDirectory` (staged, published whole) with a
model card and `heal.json` recording the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import default_data_collator
from transformers.trainer_utils import get_last_checkpoint

from mergekit_moe2dense.data import load_documents
from mergekit_moe2dense.evaluate import check_seq_len, evaluate_perplexity
from mergekit_moe2dense.heal.teacher_cache import build_teacher_cache, load_teacher_cache
from mergekit_moe2dense.heal.training import (
    DistillTrainer,
    HealError,
    SequenceDataset,
    TrainSettings,
    check_causal_lm,
    check_same_vocabulary,
    load_tokenizer,
    model_config,
    stored_dtype,
    training_sequences,
)
from mergekit_moe2dense.output_dir import OutputDirectory, _within

__all__ = ["HEAL_RECORD", "HealResult", "heal"]

HEAL_RECORD = "heal.json"


@dataclass
class HealResult:
    out_path: str
    steps: int
    tokens: int
    final_loss: float | None
    perplexity_before: float | None
    perplexity_after: float | None
    tokens_per_s: float
    record: dict


def heal(
    student: str,
    out_path: str,
    *,
    teacher: str,
    data: str,
    settings: TrainSettings,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    teacher_cache: str | None = None,
    teacher_top_k: int = 64,
    eval_data: str | None = None,
    eval_max_tokens: int | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    keep_checkpoints: bool = False,
    overwrite: bool = False,
    callbacks: list | None = None,
    progress: bool = True,
) -> HealResult:
    """Distil `teacher` into `student`, write the healed student to `out_path`."""
    settings.check()
    if lora_rank is not None and lora_rank < 1:
        raise HealError(f"--lora-rank must be at least 1, got {lora_rank}")
    if teacher_top_k < 1:
        raise HealError(f"--teacher-top-k must be at least 1, got {teacher_top_k}")
    student_config = model_config(student, "student")
    check_causal_lm(student_config, student, "student", dense=True)
    teacher_config = model_config(teacher, "teacher")
    check_causal_lm(teacher_config, teacher, "teacher", dense=None)
    tokenizer = load_tokenizer(student, "student")
    check_same_vocabulary(
        student_config, tokenizer, teacher_config, load_tokenizer(teacher, "teacher"), student, teacher
    )
    check_seq_len(student_config, settings.seq_len, student)
    check_seq_len(teacher_config, settings.seq_len, teacher)
    checkpoint_dir = os.path.abspath(checkpoint_dir or f"{os.path.abspath(out_path)}.checkpoints")
    inputs = {"the student": student, "the teacher": teacher, "the data": data, "the evaluation data": eval_data}
    out = OutputDirectory(
        out_path,
        overwrite=overwrite,
        inputs={**inputs, "the teacher cache": teacher_cache, "the checkpoint directory": checkpoint_dir},
    )
    out.check()
    for label, path in (("teacher cache", teacher_cache), ("checkpoint directory", checkpoint_dir)):
        check_work_dir(path, label, inputs)
    last = get_last_checkpoint(checkpoint_dir) if resume and os.path.isdir(checkpoint_dir) else None
    if resume and last is None:
        raise HealError(f"--resume: no checkpoint in {checkpoint_dir} to resume from")
    documents = load_documents(data)
    eval_documents = load_documents(eval_data) if eval_data else None

    steps = settings.steps(int(os.environ.get("WORLD_SIZE", "1")))
    args = settings.arguments(checkpoint_dir, steps, progress)  # initialises torch.distributed under torchrun
    sequences = training_sequences(
        documents, tokenizer, seq_len=settings.seq_len, count=steps * settings.batch_size * args.world_size,
        seed=settings.seed, label=data,
    )  # fmt: skip
    main = args.process_index == 0
    with out if main else contextlib.nullcontext():
        targets = None
        if teacher_cache:
            options = dict(top_k=teacher_top_k, temperature=settings.temperature, dtype=settings.torch_dtype)
            with args.main_process_first(local=False, desc="teacher cache"):
                if main:
                    build_teacher_cache(
                        teacher_cache, teacher, sequences, device=str(args.device), batch_size=settings.batch_size,
                        progress=progress, **options,
                    )  # fmt: skip
            targets = load_teacher_cache(teacher_cache, teacher, sequences, **options)
        model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        before = _perplexity(model, eval_documents, tokenizer, settings, eval_max_tokens, args, progress, main)
        if lora_rank is not None:
            model = _with_lora(model, lora_rank, lora_alpha, settings.seed)
        teacher_model = None
        if targets is None and settings.lm_weight < 1:
            teacher_model = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=settings.torch_dtype)
        trainer = DistillTrainer(
            model=model,
            args=args,
            train_dataset=SequenceDataset(sequences, targets),
            data_collator=default_data_collator,
            teacher=teacher_model,
            temperature=settings.temperature,
            lm_weight=settings.lm_weight,
            callbacks=callbacks,
        )
        if not progress:  # nor the printed log lines that replace the bar
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        metrics = trainer.train(resume_from_checkpoint=last).metrics
        del teacher_model, trainer.teacher
        healed = trainer.accelerator.unwrap_model(trainer.model)
        if lora_rank is not None:
            healed = healed.merge_and_unload()
        tokens = steps * settings.batch_size * args.world_size * settings.seq_len
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        record = {
            "student": student,
            "teacher": teacher,
            "data": data,
            "training_sequences": len(sequences),
            "steps": steps,
            "tokens": tokens,
            "world_size": args.world_size,
            "final_loss": losses[-1] if losses else None,
            "losses": losses,
            "mean_loss": metrics.get("train_loss"),
            "train_seconds": metrics.get("train_runtime"),
            "tokens_per_s": tokens / metrics["train_runtime"] if metrics.get("train_runtime") else None,
            # steady state: each logging interval after the first (which includes start-up)
            "tokens_per_s_logged": [e["tokens_per_s"] for e in trainer.state.log_history if "tokens_per_s" in e],
            "settings": asdict(settings),
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha if lora_rank is not None else None,
            "teacher_cache": teacher_cache,
            "teacher_top_k": teacher_top_k if teacher_cache else None,
            "resumed_from": last,
            "eval_data": eval_data,
            "perplexity_before": before,
        }
        if main:
            healed.eval()
            record["perplexity_after"] = _perplexity(
                healed, eval_documents, tokenizer, settings, eval_max_tokens, args, progress, main
            )
            healed.to(stored_dtype(student_config))
            healed.save_pretrained(out.staging)
            tokenizer.save_pretrained(out.staging)
            with open(os.path.join(out.staging, HEAL_RECORD), "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=2)
            write_heal_card(out.staging, record)
            out.publish()
    if main and not keep_checkpoints:
        _remove_checkpoints(checkpoint_dir)
    return HealResult(
        out.path, steps, tokens, record["final_loss"], before, record.get("perplexity_after"),
        record["tokens_per_s"] or 0.0, record,
    )  # fmt: skip


def check_work_dir(path: str | None, label: str, inputs: dict) -> None:
    """A directory this run writes into may not be, contain or sit inside an input."""
    if not path:
        return
    real = os.path.realpath(path)
    for name, value in inputs.items():
        if value and os.path.exists(value):
            other = os.path.realpath(value)
            if _within(real, other) or _within(other, real):
                raise HealError(f"{label} {path} overlaps {name} ({value}); choose a directory outside every input")


def _with_lora(model, rank: int, alpha: float | None, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapters' random init
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config)


def _perplexity(model, documents, tokenizer, settings, max_tokens, args, progress, main) -> float | None:
    if documents is None or not main:
        return None
    device = model.device
    model.to(args.device)
    result = evaluate_perplexity(
        model, documents, tokenizer=tokenizer, seq_len=settings.seq_len, batch_size=settings.batch_size,
        max_tokens=max_tokens, progress=progress, name="student",
    )  # fmt: skip
    model.to(device)
    return result.perplexity


def _remove_checkpoints(directory: str) -> None:
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # only if nothing else is there


def write_heal_card(out_dir: str, record: dict) -> None:
    """README.md of a healed model: what taught it, on how many tokens, with what settings."""
    settings = record["settings"]
    name = os.path.basename(os.path.normpath(out_dir)).split(".incomplete-")[0]
    ppl = ""
    if record.get("perplexity_before") is not None:
        ppl = (
            f"\nHeld-out perplexity on `{record['eval_data']}` (seq_len {settings['seq_len']}): "
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

The dense model `{record["student"]}` healed by distillation from the Mixture-of-Experts model
`{record["teacher"]}` with `mergekit-moe2dense heal`: {loss} between the teacher's and the student's
next-token distributions (temperature {settings["temperature"]}{cache}), {method}, on
{record["tokens"]} tokens of `{record["data"]}` ({record["steps"]} steps; final loss {record["final_loss"]}).
{ppl}
## Settings

| setting | value |
|---|---|
{rows}

The full record is in `{HEAL_RECORD}`.
"""
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
