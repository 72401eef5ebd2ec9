# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The checks `heal` and `collapse` make of their inputs before any model is loaded, and the
training sequences cut from their data.

Each check raises `HealError` naming the input (the student, the teacher, the MoE) and what
is wrong with it: not a causal LM, an MoE where a dense model is needed or the reverse, a
tokenizer that does not load or differs, decoder layers that differ (for the hidden-state loss),
a shard that is truncated, a working directory that overlaps OUT or an input.
"""

from __future__ import annotations

import os
import random

import torch
import transformers

from mergekit_moe2dense.data import Document, tokenize_documents
from mergekit_moe2dense.io import CheckpointError
from mergekit_moe2dense.io.checks import check_shards
from mergekit_moe2dense.io.index import read_index
from mergekit_moe2dense.output_dir import path_within
from mergekit_moe2dense.training.settings import HealError

__all__ = [
    "check_causal_lm",
    "check_same_layers",
    "check_same_vocabulary",
    "check_weights",
    "check_work_dir",
    "is_sparse",
    "load_tokenizer",
    "model_config",
    "stored_dtype",
    "training_sequences",
]


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


def check_same_layers(student_config, teacher_config, student: str, teacher: str) -> None:
    """The hidden-state loss pairs each decoder layer of the student with the teacher's: the
    same number of layers, of the same hidden size."""
    shapes = [
        (getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None))
        for text in (student_config.get_text_config(), teacher_config.get_text_config())
    ]
    if shapes[0] != shapes[1] or None in shapes[0]:
        (s_layers, s_width), (t_layers, t_width) = shapes
        raise HealError(
            f"--hidden-weight: student {student} has {s_layers} decoder layers of hidden size {s_width}, teacher "
            f"{teacher} {t_layers} of {t_width}; the hidden-state loss needs the same layers and hidden size "
            "(set --hidden-weight 0)"
        )


def stored_dtype(config: transformers.PretrainedConfig) -> torch.dtype:
    """The dtype a checkpoint's config names (float32 when it names none)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."))


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
