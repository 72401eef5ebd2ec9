# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What `heal` and `collapse` share: settings, input checks, training sequences, and
transformers' `Trainer` with the distillation loss.

Why `Trainer` and not a loop of our own: it already gives data parallel under torchrun or
`accelerate launch`, FSDP through accelerate's config, mixed precision, gradient clipping,
checkpoints with the optimiser, scheduler, RNG and data position (`--resume` continues one to
the same weights on CPU, tested), and a progress bar with the loss. What is ours is only the
loss (`compute_loss`: KD from a teacher, on the fly or cached, mixed with the LM loss) and the
tokens/s and loss parts added to its logs.

A checkpoint is resumed only when it is complete and of the same run: each `checkpoint-N`
holds `RUN_RECORD`, written last, with what defines the run (the caller's `run`: settings,
the models' and tokens' fingerprints) and the size of every file it resumes from
(`resume_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers
from safetensors import SafetensorError
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mergekit_moe2dense.checkpoint import CheckpointError, check_shards, read_index
from mergekit_moe2dense.data import Document, tokenize_documents
from mergekit_moe2dense.devices import check_device
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.heal.losses import TeacherTargets, mixed_loss
from mergekit_moe2dense.output_dir import format_gb, is_disk_full

LOG = logging.getLogger(__name__)

__all__ = [
    "DistillTrainer",
    "HealError",
    "SequenceDataset",
    "TrainSettings",
    "check_causal_lm",
    "check_same_vocabulary",
    "check_weights",
    "is_sparse",
    "resume_checkpoint",
    "training_sequences",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

RUN_RECORD = "moe2dense_run.json"  # in each checkpoint-N: the run it belongs to, and its files
# What a checkpoint resumes from, by the prefixes of transformers' file names (a model or a
# LoRA adapter, sharded or not; the optimiser and scheduler states; the step and log history)
CHECKPOINT_PARTS = {
    "weights": ("model", "pytorch_model", "adapter_model"),
    "optimizer state": ("optimizer",),
    "scheduler state": ("scheduler",),
    "trainer state": ("trainer_state",),
}


class HealError(Moe2DenseError, ValueError):
    """Bad input to `heal` or `collapse`."""


@dataclass
class TrainSettings:
    """The training run of a heal or a collapse (the CLI flags of the same names)."""

    max_tokens: int
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 1e-4
    temperature: float = 1.0
    lm_weight: float = 0.0  # 0: pure KD; 1: pure LM
    warmup: float = 0.05  # a fraction of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype: bfloat16 / float16 train mixed precision on float32 weights
    save_steps: int = 0  # 0: no checkpoints
    logging_steps: int = 10
    extra: dict = field(default_factory=dict)

    # Where the run computes and how often it logs or saves: a checkpoint resumes under others
    NOT_DEFINING = ("device", "save_steps", "logging_steps", "extra")

    def check(self) -> None:
        if self.max_tokens is None or self.max_tokens < 1:
            raise HealError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.seq_len < 2:
            raise HealError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise HealError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise HealError(f"--lr must be positive, got {self.lr}")
        if not self.temperature > 0:
            raise HealError(f"--temperature must be positive, got {self.temperature}")
        if not 0 <= self.lm_weight <= 1:
            raise HealError(f"--lm-weight must be between 0 and 1, got {self.lm_weight}")
        if self.dtype not in DTYPES:
            raise HealError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.save_steps < 0:
            raise HealError(f"--save-steps must be 0 (no checkpoints) or more, got {self.save_steps}")
        check_device(self.device)  # before any model is loaded, never silently the CPU

    def defining(self) -> dict:
        """The settings that define the training run, by flag (`DistillTrainer.run`)."""
        values = asdict(self)
        return {f"--{name.replace('_', '-')}": values[name] for name in values if name not in self.NOT_DEFINING}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def steps(self, world_size: int = 1) -> int:
        """Optimiser steps for `max_tokens` (rounded up to whole global batches)."""
        return math.ceil(self.max_tokens / (self.batch_size * world_size * self.seq_len))

    def arguments(self, output_dir: str, steps: int, progress: bool = True) -> TrainingArguments:
        mixed = {"bfloat16": {"bf16": True}, "float16": {"fp16": True}}.get(self.dtype, {})
        return TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=self.batch_size,
            max_steps=steps,
            learning_rate=self.lr,
            lr_scheduler_type="cosine",
            warmup_steps=self.warmup,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            adam_beta2=0.95,
            seed=self.seed,
            data_seed=self.seed,
            logging_steps=max(1, self.logging_steps),
            logging_first_step=True,
            save_strategy="steps" if self.save_steps else "no",
            save_steps=self.save_steps or 500,
            report_to="none",
            use_cpu=self.device == "cpu",
            dataloader_num_workers=0,
            dataloader_pin_memory=self.device != "cpu",
            remove_unused_columns=False,
            disable_tqdm=not progress,
            **mixed,
        )


# -------------------------------------------------------------------------------- checks


def model_config(path: str, label: str) -> transformers.PretrainedConfig:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise HealError(f"{label} not found: {path} is not a model directory (no config.json)")
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise HealError(f"{label} {path}: cannot read config.json ({reason})") from None


def is_sparse(config: transformers.PretrainedConfig) -> bool:
    """Whether `config` routes tokens to several experts in some layer (the dense targets
    of OLMoE, one expert, and DeepSeek, every layer dense, are not sparse)."""
    from mergekit_moe2dense.families import FAMILIES

    for family in FAMILIES:
        if family.supports(config):
            return family.num_experts(config) > 1 and bool(family.moe_layer_indices(config))
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return any((getattr(config, key, None) or 0) > 1 for key in keys)


def check_causal_lm(config: transformers.PretrainedConfig, path: str, label: str, *, dense: bool | None) -> None:
    """`dense`: True, the model must be dense; False, an MoE; None, either."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    architectures = getattr(config, "architectures", None) or [causal]
    if causal is None or causal not in architectures:
        what = f"architectures {architectures}" if causal else f"model_type {config.model_type!r}"
        raise HealError(f"{label} {path} is not a causal language model ({what})")
    sparse = is_sparse(config)
    if dense is True and sparse:
        raise HealError(
            f"{label} {path} is a Mixture-of-Experts model ({config.model_type}); heal trains a dense "
            "student: convert it first (mergekit-moe2dense CONFIG OUT)"
        )
    if dense is False and not sparse:
        raise HealError(f"{label} {path} is not a Mixture-of-Experts model (model_type {config.model_type!r})")


def check_weights(path: str, label: str) -> None:
    """Every shard of the model is there and whole (the conversion's checks), before training."""
    try:
        check_shards(read_index(path))
    except CheckpointError as error:
        raise HealError(f"{label} {path}: {error}") from None


def load_tokenizer(path: str, label: str):
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise HealError(f"{label} {path} has no tokenizer that loads ({reason})") from None


def check_same_vocabulary(student_config, student_tok, teacher_config, teacher_tok, student: str, teacher: str) -> None:
    """Distillation compares distributions token by token: one vocabulary, one tokenizer."""
    if student_config.vocab_size != teacher_config.vocab_size:
        raise HealError(
            f"student {student} has a vocabulary of {student_config.vocab_size} and teacher {teacher} one of "
            f"{teacher_config.vocab_size}: distillation needs the same tokenizer and vocabulary"
        )
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise HealError(
            f"student {student} and teacher {teacher} have different tokenizers (their vocabularies differ): "
            "distillation needs the same tokenizer"
        )
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            raise HealError(
                f"student {student} and teacher {teacher} have different tokenizers ({name} "
                f"{getattr(student_tok, name)} vs {getattr(teacher_tok, name)})"
            )


def stored_dtype(config: transformers.PretrainedConfig) -> torch.dtype:
    """The dtype a checkpoint's config names (float32 when it names none)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."))


# ------------------------------------------------------------------------------- data


def training_sequences(
    documents: list[Document], tokenizer, *, seq_len: int, count: int, seed: int, label: str
) -> torch.Tensor:
    """[n, seq_len] token windows: the documents (BOS-prefixed) concatenated and cut into
    non-overlapping windows, shuffled with `seed`, the first min(count, available) kept.
    The trainer cycles through them when the run needs more."""
    stream = [token for _, ids in tokenize_documents(documents, tokenizer) for token in ids]
    available = len(stream) // seq_len
    if available == 0:
        raise HealError(
            f"{label}: {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    windows = torch.tensor(stream[: available * seq_len], dtype=torch.long).view(available, seq_len)
    order = list(range(available))
    random.Random(seed).shuffle(order)
    return windows[order[: min(count, available)]]


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


# ---------------------------------------------------------------------------- training


class DistillTrainer(Trainer):
    """`Trainer` whose loss is `losses.mixed_loss`: KD from `teacher` (a model run on the
    fly) or from the batch's cached teacher targets, mixed with the LM loss."""

    def __init__(
        self,
        *args,
        teacher=None,
        temperature: float = 1.0,
        lm_weight: float = 0.0,
        extra_logs=None,
        run: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.extra_logs = extra_logs  # () -> dict added to each training log
        self.run = run  # what defines the run, recorded in each checkpoint (`resume_checkpoint`)
        self.teacher = teacher
        if teacher is not None:
            teacher.to(self.args.device).eval().requires_grad_(False)
        self.temperature = temperature
        self.lm_weight = lm_weight
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._tokens = 0
        self._clock: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        teacher = None
        if "teacher_indices" in inputs:
            teacher = TeacherTargets(inputs["teacher_indices"], inputs["teacher_logits"], inputs["teacher_rest_lse"])
        elif self.teacher is not None and self.lm_weight < 1:
            with torch.no_grad():
                teacher = self.teacher(input_ids=ids, use_cache=False).logits
        outputs = model(input_ids=ids, use_cache=False)
        loss, parts = mixed_loss(
            outputs.logits, ids, teacher=teacher, temperature=self.temperature, lm_weight=self.lm_weight
        )
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
