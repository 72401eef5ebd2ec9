# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`heal`: distil the MoE (teacher) into a converted dense model (student).

    heal(student, out, teacher=moe, data=path, settings=TrainSettings(max_tokens=...))

Every cheap check runs first (settings and the device, both models, their tokenizers and
vocabularies, sequence length, their shards, OUT and the working directories, the data, and
with `--resume` the checkpoint: the newest complete one, of the same run,
`training.resume_checkpoint`); then, with OUT locked: the optional teacher cache pass
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

from mergekit_moe2dense.card import write_heal_card
from mergekit_moe2dense.data import load_documents
from mergekit_moe2dense.evaluate import check_seq_len, evaluate_perplexity
from mergekit_moe2dense.fingerprint import content_fingerprint
from mergekit_moe2dense.heal.teacher_cache import prepare_teacher_cache, tokens_digest
from mergekit_moe2dense.heal.training import (
    DistillTrainer,
    HealError,
    SequenceDataset,
    TrainSettings,
    check_causal_lm,
    check_same_vocabulary,
    check_weights,
    load_tokenizer,
    model_config,
    resume_checkpoint,
    stored_dtype,
    training_sequences,
)
from mergekit_moe2dense.output_dir import OutputDirectory, path_within

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
    tokens_per_s: float  # over the steps this call trained (0 when it trained none)
    record: dict
    steps_from_checkpoint: int = 0  # of `steps`, those trained before the resumed checkpoint


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
    lora_alpha = (lora_alpha or 2 * lora_rank) if lora_rank is not None else None
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
    check_weights(student, "student")
    check_weights(teacher, "teacher")
    checkpoint_dir = os.path.abspath(checkpoint_dir or f"{os.path.abspath(out_path)}.checkpoints")
    inputs = {"the student": student, "the teacher": teacher, "the data": data, "the evaluation data": eval_data}
    out = OutputDirectory(
        out_path,
        overwrite=overwrite,
        inputs={**inputs, "the teacher cache": teacher_cache, "the checkpoint directory": checkpoint_dir},
    )
    out.check()
    for label, path in (("teacher cache", teacher_cache), ("checkpoint directory", checkpoint_dir)):
        check_work_dir(path, label, inputs, out.path)
    if resume and not os.path.isdir(checkpoint_dir):
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
    run = None
    if settings.save_steps or resume:  # what defines the run: recorded in each checkpoint, checked on resume
        run = {
            "student (content fingerprint)": content_fingerprint(student),
            "teacher (content fingerprint)": content_fingerprint(teacher),
            "training tokens (sha256)": tokens_digest(sequences),
            "processes (WORLD_SIZE)": args.world_size,
            **settings.defining(),
            "--lora-rank": lora_rank,
            "--lora-alpha": lora_alpha,
            "--teacher-top-k": teacher_top_k if teacher_cache else None,  # unset: the exact KD, on the fly
        }
    last = resume_checkpoint(checkpoint_dir, run) if resume else None
    start = int(last.rsplit("-", 1)[1]) if last else 0  # checkpoint-N: N steps done
    with out if main else contextlib.nullcontext(), _checkpoint_directory(checkpoint_dir, main):
        targets = None
        if teacher_cache:
            targets = prepare_teacher_cache(
                teacher_cache, teacher, sequences, main=main, top_k=teacher_top_k, temperature=settings.temperature,
                dtype=settings.torch_dtype, device=str(args.device), batch_size=settings.batch_size, progress=progress,
            )  # fmt: skip
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
            run=run,
        )
        if not progress:  # nor the printed log lines that replace the bar
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        metrics = trainer.train(resume_from_checkpoint=last).metrics
        del teacher_model, trainer.teacher
        healed = trainer.accelerator.unwrap_model(trainer.model)
        if lora_rank is not None:
            healed = healed.merge_and_unload()
        step_tokens = settings.batch_size * args.world_size * settings.seq_len
        tokens, trained = steps * step_tokens, steps - start
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runtime = metrics.get("train_runtime") if trained else None
        record = {
            "student": _resolved(student),
            "teacher": _resolved(teacher),
            "data": _resolved(data),
            "training_sequences": len(sequences),
            "steps": steps,  # of the whole run, resumed or not
            "tokens": tokens,
            "steps_from_checkpoint": start,
            "world_size": args.world_size,
            "final_loss": losses[-1] if losses else None,
            "losses": losses,
            # the mean, time and throughput of the steps this call trained
            "mean_loss": metrics.get("train_loss") if trained else None,
            "train_seconds": runtime,
            "tokens_per_s": trained * step_tokens / runtime if runtime else None,
            # steady state: each logging interval after the first (which includes start-up)
            "tokens_per_s_logged": [e["tokens_per_s"] for e in trainer.state.log_history if "tokens_per_s" in e],
            "settings": asdict(settings),
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha,
            "teacher_cache": _resolved(teacher_cache),
            "teacher_top_k": teacher_top_k if teacher_cache else None,
            "resumed_from": last,
            "eval_data": _resolved(eval_data),
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
            write_heal_card(out.staging, record, HEAL_RECORD)
            out.publish()
    if main and not keep_checkpoints:
        _remove_checkpoints(checkpoint_dir)
    return HealResult(
        out.path, steps, tokens, record["final_loss"], before, record.get("perplexity_after"),
        record["tokens_per_s"] or 0.0, record, start,
    )  # fmt: skip


def check_work_dir(path: str | None, label: str, inputs: dict, out_path: str | None = None) -> None:
    """A directory this run writes into may not be, contain or sit inside an input, nor OUT,
    existing or not: publishing swaps OUT whole, and refuses when OUT changed during the run."""
    if not path:
        return
    real = os.path.realpath(path)
    others = {name: value for name, value in inputs.items() if value and os.path.exists(value)}
    if out_path:
        others["OUT"] = out_path
    for name, value in others.items():
        other = os.path.realpath(value)
        if path_within(real, other) or path_within(other, real):
            raise HealError(f"{label} {path} overlaps {name} ({value}); choose a directory outside OUT and every input")


def _with_lora(model, rank: int, alpha: float, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapters' random init
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0)
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


def _resolved(path: str | None) -> str | None:
    """An input as the record keeps it: a local path made absolute, a datasets name as given."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


@contextlib.contextmanager
def _checkpoint_directory(path: str, main: bool):
    """When the run ends, however, removes `path` if the run made it and wrote no checkpoint there."""
    made = not os.path.exists(path)
    try:
        yield
    finally:
        if main and made:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only when empty


def _remove_checkpoints(directory: str) -> None:
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # only if nothing else is there
