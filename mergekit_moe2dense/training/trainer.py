# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""transformers' `Trainer` with the distillation loss, for `heal` and `collapse`, and the
checkpoints a heal resumes from.

Why `Trainer` and not a loop of our own: it already gives data parallel under torchrun or
`accelerate launch`, FSDP through accelerate's config, mixed precision, gradient clipping,
checkpoints with the optimiser, scheduler, RNG and data position (`--resume` continues one to
the same weights on CPU, tested), and a progress bar with the loss. What is ours is only the
loss (`compute_loss`: KD from a teacher, on the fly or cached, mixed with the LM loss, plus the
hidden-state loss with a teacher on the fly) and the tokens/s and loss parts added to its logs.

A checkpoint is resumed only when it is complete and of the same run: each `checkpoint-N`
holds `RUN_RECORD`, written last, with what defines the run (the caller's `run`: settings,
the models' and tokens' fingerprints) and the size of every file it resumes from
(`resume_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import time

import torch
from safetensors import SafetensorError
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mergekit_moe2dense.output_dir import format_gb, is_disk_full
from mergekit_moe2dense.training.losses import TeacherTargets, hidden_loss, mixed_loss
from mergekit_moe2dense.training.settings import HealError, TrainSettings

LOG = logging.getLogger(__name__)

__all__ = [
    "RUN_RECORD",
    "DistillTrainer",
    "LogBar",
    "LogPrinter",
    "SequenceDataset",
    "format_log",
    "resume_checkpoint",
    "training_arguments",
]

RUN_RECORD = "moe2dense_run.json"  # in each checkpoint-N: the run it belongs to, and its files
# What a checkpoint resumes from, by the prefixes of transformers' file names (a model or a
# LoRA adapter, sharded or not; the optimiser and scheduler states; the step and log history)
CHECKPOINT_PARTS = {
    "weights": ("model", "pytorch_model", "adapter_model"),
    "optimizer state": ("optimizer",),
    "scheduler state": ("scheduler",),
    "trainer state": ("trainer_state",),
}


def training_arguments(
    settings: TrainSettings, output_dir: str, steps: int, progress: bool = True
) -> TrainingArguments:
    """transformers' arguments for `settings`' run of `steps` steps, checkpointing into `output_dir`
    (under torchrun, making them initialises torch.distributed)."""
    mixed = {"bfloat16": {"bf16": True}, "float16": {"fp16": True}}.get(settings.dtype, {})
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        max_steps=steps,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        adam_beta2=0.95,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=max(1, settings.logging_steps),
        logging_first_step=True,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        report_to="none",
        use_cpu=settings.device == "cpu",
        dataloader_num_workers=0,
        dataloader_pin_memory=settings.device != "cpu",
        remove_unused_columns=False,
        disable_tqdm=not progress,
        **mixed,
    )


class SequenceDataset(torch.utils.data.Dataset):
    """Token windows and, with a teacher cache, their teacher targets."""

    def __init__(self, sequences: torch.Tensor, targets: TeacherTargets | None = None):
        self.sequences = sequences
        self.targets = targets

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.sequences[i]}
        if self.targets is not None:
            item.update(
                teacher_indices=self.targets.indices[i],
                teacher_logits=self.targets.logits[i],
                teacher_rest_lse=self.targets.rest_lse[i],
            )
        return item


def format_log(logs: dict, step: int, max_steps: int) -> str:
    """A training log as one line: `step 10/100: loss 2.345, kd 2.1, learning_rate 9.5e-05, ...`,
    numbers as numbers (transformers prints the dict, its floats turned into strings)."""
    parts = [
        f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
        for name, value in logs.items()
        if name not in ("total_flos", "epoch")
    ]
    return f"step {step}/{max_steps}: " + ", ".join(parts)


class LogBar(ProgressCallback):
    """transformers' progress bar, each log written above it as `format_log`'s line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log(logs, state.global_step, state.max_steps))


class LogPrinter(PrinterCallback):
    """Without a bar: each log printed as `format_log`'s line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(format_log(logs, state.global_step, state.max_steps), flush=True)


class DistillTrainer(Trainer):
    """`Trainer` whose loss is `losses.mixed_loss`: KD from `teacher` (a model run on the
    fly) or from the batch's cached teacher targets, mixed with the LM loss; plus
    `hidden_weight` x `losses.hidden_loss` against `teacher`'s hidden states when above 0."""

    def __init__(
        self,
        *args,
        teacher=None,
        temperature: float = 1.0,
        lm_weight: float = 0.0,
        hidden_weight: float = 0.0,
        extra_logs=None,
        run: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        for stock, ours in ((ProgressCallback, LogBar), (PrinterCallback, LogPrinter)):
            if any(type(callback) is stock for callback in self.callback_handler.callbacks):
                self.remove_callback(stock)
                self.add_callback(ours)
        self.extra_logs = extra_logs  # () -> dict added to each training log
        self.run = run  # what defines the run, recorded in each checkpoint (`resume_checkpoint`)
        self.teacher = teacher
        if teacher is not None:
            teacher.to(self.args.device).eval().requires_grad_(False)
        if hidden_weight > 0 and teacher is None:
            raise HealError("--hidden-weight needs the teacher on the fly (its hidden states)")
        self.temperature = temperature
        self.lm_weight = lm_weight
        self.hidden_weight = hidden_weight
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._tokens = 0
        self._clock: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        hidden = self.hidden_weight > 0
        teacher = teacher_hidden = None
        if "teacher_indices" in inputs:
            teacher = TeacherTargets(inputs["teacher_indices"], inputs["teacher_logits"], inputs["teacher_rest_lse"])
        elif self.teacher is not None and (self.lm_weight < 1 or hidden):
            with torch.no_grad():
                found = self.teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            teacher, teacher_hidden = found.logits, found.hidden_states
        outputs = model(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        loss, parts = mixed_loss(
            outputs.logits, ids, teacher=teacher, temperature=self.temperature, lm_weight=self.lm_weight
        )
        if hidden:  # [0]: the embeddings; then each decoder layer's output (the last one after the final norm)
            part = hidden_loss(outputs.hidden_states[1:], teacher_hidden[1:])
            loss = loss + self.hidden_weight * part
            parts["hidden"] = part.detach()
        for name, value in parts.items():
            self._parts.setdefault(name, []).append(value)
        self._tokens += ids.numel()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the loss parts and this rank's throughput since the last one
            for name, values in self._parts.items():
                logs[name] = round(torch.stack(values).mean().item(), 6)
            self._parts = {}
            now = time.perf_counter()
            if self._clock is not None:
                logs["tokens_per_s"] = round(self._tokens * self.args.world_size / (now - self._clock), 1)
            self._clock, self._tokens = now, 0
            if self.extra_logs is not None:
                logs.update(self.extra_logs())
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint, then its `RUN_RECORD`; a full disk is one line naming the
        checkpoint, the space one needs and the space free (and leaves no partial checkpoint)."""
        folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with contextlib.suppress(FileNotFoundError):  # rewritten in place: complete only once recorded again
            os.remove(os.path.join(folder, RUN_RECORD))
        needed = self._checkpoint_bytes()
        try:
            super()._save_checkpoint(model, trial)
            if self.run is not None and self.args.should_save:
                _write_run_record(folder, self.run)
            return
        except Exception as error:  # torch.save reports ENOSPC as a bare RuntimeError: judged by the free space too
            if not (is_disk_full(error) or shutil.disk_usage(self.args.output_dir).free < needed):
                raise
        shutil.rmtree(folder, ignore_errors=True)
        free = shutil.disk_usage(self.args.output_dir).free
        raise HealError(
            f"not enough space for checkpoint {folder}: a checkpoint needs about {format_gb(needed)}, {format_gb(free)} is "
            "free; free space, give another --checkpoint-dir, or save less often (--save-steps)"
        )

    def _checkpoint_bytes(self) -> int:
        """About what a checkpoint takes: the weights saved (the adapters' alone under LoRA) and
        AdamW's two moments of every trained parameter."""
        sizes = [(p.numel() * p.element_size(), p.requires_grad) for p in self.model.parameters()]
        trained = sum(size for size, grad in sizes if grad)
        saved = trained if getattr(self.model, "peft_config", None) else sum(size for size, _ in sizes)
        return saved + 2 * trained

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        with _loading(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        with _loading(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)


@contextlib.contextmanager
def _loading(checkpoint: str | None):
    """What transformers raises on a checkpoint it cannot load into this run, in one line."""
    try:
        yield
    except (RuntimeError, ValueError, OSError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise HealError(
            f"--resume: {checkpoint} does not load into this run ({reason}); give another --checkpoint-dir, "
            "or run without --resume"
        ) from None


# --------------------------------------------------------------------------- checkpoints


def resume_checkpoint(directory: str, run: dict) -> str:
    """The newest complete checkpoint in `directory` (newer incomplete ones are skipped, with a
    warning naming them), refused unless it was made by the same `run`."""
    found = (re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name) for name in os.listdir(directory))
    names = [m.group(0) for m in sorted(filter(None, found), key=lambda m: -int(m.group(1)))]
    names = [name for name in names if os.path.isdir(os.path.join(directory, name))]
    if not names:
        raise HealError(f"--resume: no checkpoint in {directory} to resume from")
    skipped = []
    for name in names:
        path = os.path.join(directory, name)
        record, problem = _read_run_record(path)
        if problem is not None:
            skipped.append(f"{name}: {problem}")
            continue
        if skipped:
            LOG.warning("--resume: resuming from %s; skipped the newer incomplete %s", path, "; ".join(skipped))
        differences = [
            f"{key} was {_shown(record['run'].get(key))} in the checkpoint, {_shown(value)} now"
            for key, value in run.items()
            if record["run"].get(key) != value
        ]
        if differences:
            raise HealError(
                f"--resume: {path} is a checkpoint of another run ({'; '.join(differences)}); resume with the "
                "settings and inputs it was made with, or give another --checkpoint-dir"
            )
        return path
    raise HealError(
        f"--resume: no complete checkpoint in {directory} ({'; '.join(skipped)}); run without --resume to start "
        "over, or give another --checkpoint-dir"
    )


def _shown(value) -> str:
    if value is None:
        return "unset"
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)  # a sha256: its start


def _checkpoint_files(folder: str) -> dict[str, int]:
    """The size of each file of `folder` that `CHECKPOINT_PARTS` names (relative paths)."""
    prefixes = tuple(prefix for group in CHECKPOINT_PARTS.values() for prefix in group)
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.relpath(path, folder).startswith(prefixes):
                files[os.path.relpath(path, folder)] = os.path.getsize(path)
    return files


def _write_run_record(folder: str, run: dict) -> None:
    path = os.path.join(folder, RUN_RECORD)
    with open(path + ".partial", "w", encoding="utf-8") as handle:
        json.dump({"run": run, "files": _checkpoint_files(folder)}, handle)
    os.replace(path + ".partial", path)


def _read_run_record(folder: str) -> tuple[dict | None, str | None]:
    """(the record, None) for a complete checkpoint: its record readable and every file it lists
    there, whole; else (None, what is wrong)."""
    try:
        with open(os.path.join(folder, RUN_RECORD), encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return None, f"no {RUN_RECORD} (it was not finished, or not written by heal)"
    except (OSError, ValueError):
        record = None
    if not (isinstance(record, dict) and isinstance(record.get("run"), dict) and isinstance(record.get("files"), dict)):
        return None, f"its {RUN_RECORD} is unreadable"
    files = record["files"]
    for part, prefixes in CHECKPOINT_PARTS.items():
        if not any(name.startswith(prefixes) for name in files):
            return None, f"it holds no {part}"
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return None, f"{name} is missing"
        if os.path.getsize(path) != size:
            return None, f"{name} is {os.path.getsize(path)} bytes, {size} when it was written"
    return record, None
