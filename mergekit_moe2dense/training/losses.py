# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Distillation losses: forward KL from a teacher's next-token distribution, exact or from
a top-k cache, optionally mixed with the language-model loss; and a loss on the hidden states.

With temperature T, p = softmax(t / T) (teacher), q = softmax(s / T) (student), per token:

- exact: KL(p || q) = sum_v p_v (log p_v - log q_v), over the whole vocabulary;
- cached (`TeacherTargets`: the teacher's top-k logits a_I = t_I / T and the log-sum-exp
  r = lse_{v not in I} t_v / T of the rest): KL of the two distributions coarsened to the
  k tokens and one "rest" bucket,
  sum_{i in I} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),
  with q_rest = 1 - sum_I q_i (floored at 1e-6). It never exceeds the exact KL (coarsening
  cannot increase a divergence) and equals it when k is the vocabulary size.

Both are multiplied by T^2 (Hinton et al. 2015), so that gradients keep their scale across
temperatures. `mixed_loss` = (1 - w) * that + w * next-token cross-entropy.

`hidden_loss` compares the student's and the teacher's hidden states h_l at each decoder
layer's output l = 1..L (same layer count and width: the student is the teacher with other
MLPs): mean_l [ mean((h_l^s - h_l^t)^2) / mean((h_l^t)^2) ], the means over tokens and
features. Each layer's error is relative to the teacher's mean square there, so layers weigh
alike although the residual stream grows with depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REST_FLOOR = 1e-6  # the smallest rest mass of the student that the cached loss resolves

__all__ = ["TeacherTargets", "cached_kl", "exact_kl", "hidden_loss", "lm_loss", "mixed_loss", "top_k_targets"]


@dataclass
class TeacherTargets:
    """A teacher's top-k next-token logits at a temperature, per token."""

    indices: torch.Tensor  # [..., k] int64
    logits: torch.Tensor  # [..., k] float32, t_I / T
    rest_lse: torch.Tensor  # [...] float32, lse of the other t_v / T (-inf when k = V)


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTargets:
    """What the teacher cache stores for `teacher_logits` [..., V]."""
    scaled = teacher_logits.float() / temperature
    k = min(k, scaled.shape[-1])
    values, indices = scaled.topk(k, dim=-1)
    rest = scaled.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return TeacherTargets(indices, values, rest)


def exact_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 KL(softmax(t/T) || softmax(s/T)), over the whole vocabulary."""
    log_q = _scaled(student_logits, temperature).log_softmax(-1)
    log_p = _scaled(teacher_logits, temperature).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.mean() * temperature**2


def cached_kl(student_logits: torch.Tensor, targets: TeacherTargets, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 times the KL of the top-k + rest coarsening (module docstring).

    The student's rest mass is 1 - sum_I q_i, floored at `REST_FLOOR` (one log-sum-exp and one
    gather over the vocabulary, as the LM loss costs; no masked copy of the logits)."""
    scaled = _scaled(student_logits, temperature)
    # log q_I = s_I - lse(s): a gather and one reduction, no [.., V] log-softmax output kept
    log_q_top = scaled.gather(-1, targets.indices) - scaled.logsumexp(-1, keepdim=True)
    log_q_rest = torch.log1p(-log_q_top.exp().sum(-1).clamp(max=1 - REST_FLOOR))
    teacher_z = torch.cat([targets.logits, targets.rest_lse[..., None]], -1).logsumexp(-1)
    log_p_top = targets.logits - teacher_z[..., None]
    log_p_rest = targets.rest_lse - teacher_z
    kl = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
    finite = torch.isfinite(log_p_rest)  # -inf when the cache kept the whole vocabulary
    log_p_rest = torch.where(finite, log_p_rest, torch.zeros_like(log_p_rest))
    kl = kl + torch.where(finite, log_p_rest.exp() * (log_p_rest - log_q_rest), torch.zeros_like(log_p_rest))
    return kl.mean() * temperature**2


def lm_loss(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of [B, T, V] logits against the shifted ids. The labels
    are shifted (the last position ignored), not the logits: no copy of the [B, T, V] logits,
    as transformers' own causal-LM loss does it."""
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    logits = student_logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32 (no copy when they are float32 already and T = 1)."""
    logits = logits.float()
    return logits if temperature == 1 else logits / temperature


def mixed_loss(
    student_logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    teacher: torch.Tensor | TeacherTargets | None,
    temperature: float,
    lm_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - lm_weight) * KD + lm_weight * LM, and both parts for the logs."""
    parts: dict[str, torch.Tensor] = {}
    total = student_logits.new_zeros((), dtype=torch.float32)
    if lm_weight < 1:
        if isinstance(teacher, TeacherTargets):
            kd = cached_kl(student_logits, teacher, temperature)
        else:
            kd = exact_kl(student_logits, teacher, temperature)
        total = total + (1 - lm_weight) * kd
        parts["kd"] = kd.detach()
    if lm_weight > 0:
        lm = lm_loss(student_logits, input_ids)
        total = total + lm_weight * lm
        parts["lm"] = lm.detach()
    return total, parts


def hidden_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the squared error of the student's hidden states, relative to the
    teacher's mean square at that layer (module docstring); 0 exactly when they are equal.

    Each sequence holds one [..., H] tensor per decoder layer (transformers' `hidden_states`
    without the embeddings, `[1:]`)."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student hidden states, {len(teacher_hidden)} of the teacher")
    terms = []
    for student, teacher in zip(student_hidden, teacher_hidden):
        if student.shape != teacher.shape:
            raise ValueError(f"student hidden states {tuple(student.shape)}, teacher's {tuple(teacher.shape)}")
        teacher = teacher.detach().float()
        scale = teacher.square().mean().clamp_min(torch.finfo(torch.float32).tiny)  # a layer of zeros: no NaN
        terms.append((student.float() - teacher).square().mean() / scale)
    return torch.stack(terms).mean()
