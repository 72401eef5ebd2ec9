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
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import transformers
from transformers import Trainer, TrainingArguments

from mergekit_moe2dense.data import Document, tokenize_documents
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.heal.losses import TeacherTargets, mixed_loss

__all__ = [
    "DistillTrainer",
    "HealError",
    "SequenceDataset",
    "TrainSettings",
    "check_causal_lm",
    "check_same_vocabulary",
    "is_sparse",
    "training_sequences",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        self, *args, teacher=None, temperature: float = 1.0, lm_weight: float = 0.0, extra_logs=None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.extra_logs = extra_logs  # () -> dict added to each training log
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
