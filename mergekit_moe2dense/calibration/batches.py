# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Calibration text -> padded token batches with attention masks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mergekit_moe2dense.data import DataError, Document


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T], 0 on padding


def calibration_sequences(
    documents: list[Document], tokenizer, *, num_samples: int, seq_len: int, seed: int
) -> list[list[int]]:
    """Up to `num_samples` token sequences of at most `seq_len` tokens.

    Each document is tokenized (with BOS when the tokenizer has one) and cut into
    seq_len pieces; pieces are shuffled with `seed` so samples cover many documents.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pieces = []
    for document in documents:
        ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        ids = bos + ids
        pieces.extend(ids[i : i + seq_len] for i in range(0, len(ids), seq_len))
    pieces = [piece for piece in pieces if len(piece) > 1]
    if not pieces:
        raise DataError("calibration data has no text to tokenize")
    random.Random(seed).shuffle(pieces)
    return pieces[:num_samples]


def pad_batches(sequences: list[list[int]], batch_size: int, pad_token_id: int) -> Iterator[TokenBatch]:
    """Right-padded batches; sequences are sorted by length to waste little padding."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        chunk = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(seq) for seq in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield TokenBatch(ids, mask)
