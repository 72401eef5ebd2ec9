# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`heal`: distil the MoE (teacher) into a converted dense model (student).

    heal(HealSettings(student=dense, teacher=moe, data=path, training=TrainSettings(max_tokens=...)), out)

Every cheap check runs first (the settings when they are made; then the device, both models,
their tokenizers and vocabularies, sequence length, with `hidden_weight` their layers, their
shards, OUT and the working directories, the data, and with `resume` the checkpoint: the newest
complete one, of the same run, `trainer.resume_checkpoint`); then, with OUT locked: the
optional teacher cache pass (`teacher_cache.py`), the student's held-out perplexity, training
(`trainer.DistillTrainer`, full fine-tuning or LoRA through peft), the merge of the LoRA into
the weights, the perplexity after, and OUT written through `OutputDirectory` (staged, published
whole) with a model card and `heal.json` recording the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass

import torch
import transformers
from transformers import TrainingArguments, default_data_collator

from mergekit_moe2dense.card import conversion_lineage, write_heal_card
from mergekit_moe2dense.data import Document, load_documents
from mergekit_moe2dense.devices import check_device
from mergekit_moe2dense.io.fingerprint import content_fingerprint
from mergekit_moe2dense.output_dir import OutputDirectory
from mergekit_moe2dense.perplexity import check_seq_len, evaluate_perplexity, load_eval_documents
from mergekit_moe2dense.training.inputs import (
    check_causal_lm,
    check_same_layers,
    check_same_vocabulary,
    check_weights,
    check_work_dir,
    load_tokenizer,
    model_config,
    stored_dtype,
    training_sequences,
)
from mergekit_moe2dense.training.settings import HealError, HealSettings
from mergekit_moe2dense.training.teacher_cache import TargetSpec, prepare_teacher_cache, tokens_digest
from mergekit_moe2dense.training.trainer import (
    DistillTrainer,
    SequenceDataset,
    resume_checkpoint,
    training_arguments,
)

__all__ = ["HEAL_RECORD", "HealResult", "heal"]

HEAL_RECORD = "heal.json"


@dataclass
class HealResult:
    """What a heal did: its steps and tokens (of the whole run, resumed or not), its losses,
    throughput and held-out perplexities, and its record (`heal.json`)."""

    out_path: str
    steps: int
    tokens: int
    final_loss: float | None
    perplexity_before: float | None
    perplexity_after: float | None
    tokens_per_s: float  # over the steps this call trained (0 when it trained none)
    record: dict
    steps_from_checkpoint: int = 0  # of `steps`, those trained before the resumed checkpoint


@dataclass(frozen=True)
class _Run:
    """One heal as prepared by the checks: what training it and writing OUT read."""

    settings: HealSettings
    args: TrainingArguments  # transformers' arguments: this process's rank, device and world size
    steps: int  # of the whole run, resumed or not
    sequences: torch.Tensor  # [n, seq_len] training tokens
    tokenizer: transformers.PreTrainedTokenizerBase
    student_config: transformers.PretrainedConfig
    eval_documents: list[Document] | None
    run: dict | None  # what defines the run, recorded in each checkpoint (None: no checkpoints)
    last: str | None  # the checkpoint resumed from
    progress: bool

    @property
    def main(self) -> bool:
        return self.args.process_index == 0

    @property
    def start(self) -> int:
        """Steps done before this call: N of the checkpoint-N resumed from."""
        return int(self.last.rsplit("-", 1)[1]) if self.last else 0


def heal(
    settings: HealSettings,
    out_path: str,
    *,
    overwrite: bool = False,
    callbacks: list | None = None,
    progress: bool = True,
) -> HealResult:
    """Distil `settings.teacher` into `settings.student`, write the healed student to `out_path`."""
    check_device(settings.training.device)  # before any model is loaded, never silently the CPU
    student_config, tokenizer = _check_models(settings)
    checkpoint_dir = os.path.abspath(settings.checkpoint_dir or f"{os.path.abspath(out_path)}.checkpoints")
    out = _check_directories(settings, out_path, checkpoint_dir, overwrite)
    documents = load_documents(settings.data)
    eval_documents = load_eval_documents(settings.eval_data) if settings.eval_data else None  # as `eval` reads them

    training = settings.training
    steps = training.steps(int(os.environ.get("WORLD_SIZE", "1")))
    args = training_arguments(training, checkpoint_dir, steps, progress)  # initialises torch.distributed under torchrun
    sequences = training_sequences(
        documents, tokenizer, seq_len=training.seq_len, count=steps * training.batch_size * args.world_size,
        seed=training.seed, label=settings.data,
    )  # fmt: skip
    run = _run_identity(settings, sequences, args.world_size) if training.save_steps or settings.resume else None
    last = resume_checkpoint(checkpoint_dir, run) if settings.resume else None
    prepared = _Run(
        settings=settings, args=args, steps=steps, sequences=sequences, tokenizer=tokenizer,
        student_config=student_config, eval_documents=eval_documents, run=run, last=last, progress=progress,
    )  # fmt: skip
    main = prepared.main
    with out if main else contextlib.nullcontext(), _checkpoint_directory(checkpoint_dir, main):
        healed, trainer, metrics, before = _train(prepared, callbacks)
        record = _record(prepared, trainer, metrics, before)
        if main:
            _write(prepared, healed, record, out.staging)
            out.publish()
    if main and not settings.keep_checkpoints:
        _remove_checkpoints(checkpoint_dir)
    return HealResult(
        out.path, steps, record["tokens"], record["final_loss"], before, record.get("perplexity_after"),
        record["tokens_per_s"] or 0.0, record, prepared.start,
    )  # fmt: skip


def _check_models(settings: HealSettings) -> tuple[transformers.PretrainedConfig, object]:
    """Both models as heal needs them, from their configs, tokenizers and shards alone: a dense
    causal LM student, a causal LM teacher, one vocabulary, windows of `--seq-len` within both
    models' positions, every shard whole. Returns the student's config and tokenizer."""
    student, teacher, seq_len = settings.student, settings.teacher, settings.training.seq_len
    student_config = model_config(student, "student")
    check_causal_lm(student_config, student, "student", dense=True)
    teacher_config = model_config(teacher, "teacher")
    check_causal_lm(teacher_config, teacher, "teacher", dense=None)
    tokenizer = load_tokenizer(student, "student")
    check_same_vocabulary(
        student_config, tokenizer, teacher_config, load_tokenizer(teacher, "teacher"), student, teacher
    )
    check_seq_len(student_config, seq_len, student)
    check_seq_len(teacher_config, seq_len, teacher)
    if settings.hidden_weight > 0:
        check_same_layers(student_config, teacher_config, student, teacher)
    check_weights(student, "student")
    check_weights(teacher, "teacher")
    return student_config, tokenizer


def _check_directories(settings: HealSettings, out_path: str, checkpoint_dir: str, overwrite: bool) -> OutputDirectory:
    """OUT (not an input, empty unless `overwrite`), and the teacher cache and checkpoint
    directories (neither inside OUT nor an input; with `resume`, the checkpoints there)."""
    inputs = {
        "the student": settings.student,
        "the teacher": settings.teacher,
        "the data": settings.data,
        "the evaluation data": settings.eval_data,
    }
    out = OutputDirectory(
        out_path,
        overwrite=overwrite,
        inputs={**inputs, "the teacher cache": settings.teacher_cache, "the checkpoint directory": checkpoint_dir},
    )
    out.check()
    for label, path in (("teacher cache", settings.teacher_cache), ("checkpoint directory", checkpoint_dir)):
        check_work_dir(path, label, inputs, out.path)
    if settings.resume and not os.path.isdir(checkpoint_dir):
        raise HealError(f"--resume: no checkpoint in {checkpoint_dir} to resume from")
    return out


def _run_identity(settings: HealSettings, sequences: torch.Tensor, world_size: int) -> dict:
    """What defines the run: recorded in each checkpoint, compared on resume (by flag)."""
    return {
        "student (content fingerprint)": content_fingerprint(settings.student),
        "teacher (content fingerprint)": content_fingerprint(settings.teacher),
        "training tokens (sha256)": tokens_digest(sequences),
        "processes (WORLD_SIZE)": world_size,
        **settings.training.defining(),
        # unset without the hidden-state loss, as in the checkpoints of runs without it
        "--hidden-weight": settings.hidden_weight or None,
        "--lora-rank": settings.lora_rank,
        "--lora-alpha": settings.effective_lora_alpha,
        # unset without a cache: the exact KD, on the fly
        "--teacher-top-k": settings.teacher_top_k if settings.teacher_cache else None,
    }


def _train(prepared: _Run, callbacks: list | None):
    """The student trained (LoRA merged into its weights), the trainer, its metrics, and the
    held-out perplexity before training."""
    settings, training, args = prepared.settings, prepared.settings.training, prepared.args
    targets = None
    if settings.teacher_cache:
        spec = TargetSpec(settings.teacher_top_k, training.temperature, training.torch_dtype)
        targets = prepare_teacher_cache(
            settings.teacher_cache, settings.teacher, prepared.sequences, spec, main=prepared.main,
            device=str(args.device), batch_size=training.batch_size, progress=prepared.progress,
        )  # fmt: skip
    before = _perplexity(settings.student, prepared)
    model = transformers.AutoModelForCausalLM.from_pretrained(settings.student, dtype=torch.float32)
    if settings.lora_rank is not None:
        model = _with_lora(model, settings.lora_rank, settings.effective_lora_alpha, training.seed)
    teacher_model = None
    if targets is None and (training.lm_weight < 1 or settings.hidden_weight > 0):
        teacher_model = transformers.AutoModelForCausalLM.from_pretrained(settings.teacher, dtype=training.torch_dtype)
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=SequenceDataset(prepared.sequences, targets),
        data_collator=default_data_collator,
        teacher=teacher_model,
        temperature=training.temperature,
        lm_weight=training.lm_weight,
        hidden_weight=settings.hidden_weight,
        callbacks=callbacks,
        run=prepared.run,
    )
    if not prepared.progress:  # nor the printed log lines that replace the bar
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    metrics = trainer.train(resume_from_checkpoint=prepared.last).metrics
    del teacher_model, trainer.teacher
    healed = trainer.accelerator.unwrap_model(trainer.model)
    if settings.lora_rank is not None:
        healed = healed.merge_and_unload()
    return healed, trainer, metrics, before


def _record(prepared: _Run, trainer: DistillTrainer, metrics: dict, before: float | None) -> dict:
    """`heal.json`: the inputs, the whole run's steps and losses, the throughput of the steps this
    call trained, every setting."""
    settings, training, world_size = prepared.settings, prepared.settings.training, prepared.args.world_size
    step_tokens = training.batch_size * world_size * training.seq_len
    trained = prepared.steps - prepared.start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    runtime = metrics.get("train_runtime") if trained else None
    return {
        "student": _resolved(settings.student),
        "teacher": _resolved(settings.teacher),
        "data": _resolved(settings.data),
        "training_sequences": len(prepared.sequences),
        "steps": prepared.steps,  # of the whole run, resumed or not
        "tokens": prepared.steps * step_tokens,
        "steps_from_checkpoint": prepared.start,
        "world_size": world_size,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        # the mean, time and throughput of the steps this call trained
        "mean_loss": metrics.get("train_loss") if trained else None,
        "train_seconds": runtime,
        "tokens_per_s": trained * step_tokens / runtime if runtime else None,
        # steady state: each logging interval after the first (which includes start-up)
        "tokens_per_s_logged": [e["tokens_per_s"] for e in trainer.state.log_history if "tokens_per_s" in e],
        "settings": training.model_dump(),
        "hidden_weight": settings.hidden_weight,
        "lora_rank": settings.lora_rank,
        "lora_alpha": settings.effective_lora_alpha,
        "teacher_cache": _resolved(settings.teacher_cache),
        "teacher_top_k": settings.teacher_top_k if settings.teacher_cache else None,
        "resumed_from": prepared.last,
        "eval_data": _resolved(settings.eval_data),
        "perplexity_before": before,
    }


def _write(prepared: _Run, healed, record: dict, staging: str) -> None:
    """The healed student, in its stored dtype, with its tokenizer, `heal.json` (the perplexity
    after added to `record`) and its card, into `staging`."""
    healed.eval()
    healed.to(stored_dtype(prepared.student_config))
    healed.save_pretrained(staging)
    _save_tokenizer(prepared.tokenizer, staging)
    record["perplexity_after"] = _perplexity(staging, prepared)  # the model as written
    with open(os.path.join(staging, HEAL_RECORD), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    write_heal_card(staging, record, HEAL_RECORD, lineage=conversion_lineage(prepared.settings.student))


# Keys transformers adds when it saves a tokenizer it loaded from a local directory: where it
# was loaded from, not how to load it; a published model's tokenizer config leaves them out.
LOAD_TIME_KEYS = ("is_local", "local_files_only")


def _save_tokenizer(tokenizer, directory: str) -> None:
    """The student's tokenizer files, its config without the keys of the local load."""
    tokenizer.save_pretrained(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if any(key in config for key in LOAD_TIME_KEYS):
        for key in LOAD_TIME_KEYS:
            config.pop(key, None)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, ensure_ascii=False)
            handle.write("\n")


def _with_lora(model, rank: int, alpha: float, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapters' random init
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config)


def _perplexity(model_dir: str, prepared: _Run) -> float | None:
    """The held-out perplexity of the model in `model_dir` (on the main process, with
    `eval_data`), on the training device: loaded and scored as `eval` scores a model directory
    (in its stored dtype), so that `eval` on the same model, data and --seq-len gives the same figure."""
    if prepared.eval_documents is None or not prepared.main:
        return None
    training = prepared.settings.training
    result = evaluate_perplexity(
        model_dir, prepared.eval_documents, tokenizer=prepared.tokenizer, seq_len=training.seq_len,
        batch_size=training.batch_size, max_tokens=prepared.settings.eval_max_tokens,
        device=str(prepared.args.device), progress=prepared.progress, name="student",
    )  # fmt: skip
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
