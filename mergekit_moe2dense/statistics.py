# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Router statistics: what one calibration pass records for every method.

Per MoE layer and expert: sums of router logits, of softmax probabilities, of
top-k selections and of the model's real top-k gate weights, over non-padding
tokens; and the router logits of a fixed subsample of tokens (the same tokens in
every layer, so per-token vectors can be compared or concatenated across layers).
On request of a method's score (`ExpertMethod.needs_expert_outputs`) also the E x E Gram
matrix of every expert's output on those sampled tokens and REAP's full-softmax
saliency; default runs record and save neither.
Sums are kept, means are derived: softmax of *summed* logits over thousands of
tokens is one-hot, so every method works from means.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_moe2dense.errors import Moe2DenseError

# Files of ours that are not the model live in OUT/moe2dense/: loaders take every
# *.safetensors at the top of a model directory for weights (vLLM without an index),
# and do not look into subdirectories. JSON files next to the model are read by none.
SIDECAR_DIR = "moe2dense"
STATS_FILE = f"{SIDECAR_DIR}/router_stats.safetensors"  # relative to OUT
LEGACY_STATS_FILE = "router_stats.safetensors"  # where earlier versions wrote it, at the top of OUT

FORMAT_VERSION = 1
SUMS = ("logit_sum", "prob_sum", "selected", "gate_sum", "contribution_sum")
EXPERT_OUTPUT_SUMS = ("output_gram", "softmax_contribution_sum")  # recorded on request only


class StatisticsError(Moe2DenseError, ValueError):
    """A statistics file is unreadable, or belongs to another model."""


@dataclass
class RouterStatistics:
    layers: list[int]  # decoder layer index of each MoE layer, in order
    num_experts: int
    top_k: int
    tokens: int = 0
    logit_sum: torch.Tensor | None = None  # [L, E] float64
    prob_sum: torch.Tensor | None = None  # [L, E] float64
    selected: torch.Tensor | None = None  # [L, E] float64, count of top-k selections
    gate_sum: torch.Tensor | None = None  # [L, E] float64, the model's top-k gate weights
    # [L, E] float64, sum over routed tokens of gate weight x ||expert output||_2 (REAP's saliency
    # numerator); all zero in files written before it was recorded
    contribution_sum: torch.Tensor | None = None
    samples: torch.Tensor | None = None  # [L, N, E] float32, logits of sampled tokens
    # [L] float64, per-token multiplier of the shared experts (Qwen2-MoE's sigmoid gate); 0 where ungated
    shared_gate_sum: torch.Tensor | None = None
    # [L, N, H] float32, the routers' inputs (hidden states) of the same sampled tokens;
    # recorded only on request (`record_router_inputs`), for fitting new routers
    router_inputs: torch.Tensor | None = None
    # [L, E, E] float64, G_ij = sum_t <f_i(x_t), f_j(x_t)> over the sampled tokens, every expert
    # run on each (selection.py); recorded only on request, for the diversity scores
    output_gram: torch.Tensor | None = None
    # [L, E] float64, sum over routed tokens of softmax probability x ||expert output||: REAP's
    # saliency without renormalising the top-k weights; recorded with `output_gram`
    softmax_contribution_sum: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        shape = (len(self.layers), self.num_experts)
        for name in SUMS:
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, dtype=torch.float64))
        if self.shared_gate_sum is None:
            self.shared_gate_sum = torch.zeros(len(self.layers), dtype=torch.float64)
        if self.samples is None:
            self.samples = torch.zeros((len(self.layers), 0, self.num_experts))

    # -- derived means ---------------------------------------------------------
    def _mean(self, total: torch.Tensor) -> torch.Tensor:
        if self.tokens == 0:
            raise StatisticsError("no calibration tokens were recorded")
        return total / self.tokens

    @property
    def mean_logits(self) -> torch.Tensor:
        return self._mean(self.logit_sum)

    @property
    def mean_probs(self) -> torch.Tensor:
        return self._mean(self.prob_sum)

    @property
    def selection_frequency(self) -> torch.Tensor:
        """Fraction of tokens that route to each expert (rows sum to top_k)."""
        return self._mean(self.selected)

    @property
    def mean_gate(self) -> torch.Tensor:
        """Mean gate weight per token, zero where not selected (rows sum to the mixture's weight)."""
        return self._mean(self.gate_sum)

    @property
    def mean_shared_gate(self) -> torch.Tensor:
        """[L] mean per-token gate of the shared experts."""
        return self._mean(self.shared_gate_sum)

    @property
    def mean_contribution(self) -> torch.Tensor:
        """Mean over tokens of gate weight x ||expert output|| (zero where not selected)."""
        if not bool(self.contribution_sum.any()):
            raise StatisticsError(
                "the statistics have no expert contributions (recorded by an older version); recalibrate"
            )
        return self._mean(self.contribution_sum)

    @property
    def reap_saliency(self) -> torch.Tensor:
        """REAP's saliency (arXiv:2510.13999): the mean over the tokens *routed to* each expert of
        gate weight x ||expert output||, i.e. contribution_sum / selected (0 for an expert no token selects)."""
        self.mean_contribution  # noqa: B018 (refuses files recorded before contributions were)
        return torch.where(self.selected > 0, self.contribution_sum / self.selected.clamp_min(1), 0.0)

    @property
    def gram(self) -> torch.Tensor:
        """[L, E, E] the Gram matrix of the experts' outputs on the sampled tokens."""
        if self.output_gram is None or not bool(self.output_gram.any()):
            raise StatisticsError(
                "the statistics have no Gram matrix of the experts' outputs (recorded only for a "
                "diversity or reap_softmax score, on sampled tokens); recalibrate without --stats"
            )
        return self.output_gram

    @property
    def reap_softmax_saliency(self) -> torch.Tensor:
        """REAP's saliency with the full-softmax probability as the gate (Cerebras' reference
        without `renormalize_router_weights`): softmax_contribution_sum / selected."""
        self.gram  # noqa: B018 (recorded together: refuses files recorded without them)
        total = self.softmax_contribution_sum
        return torch.where(self.selected > 0, total / self.selected.clamp_min(1), 0.0)

    def update_contribution(self, position: int, expert: int, weights: torch.Tensor, outputs: torch.Tensor) -> None:
        """Add sum_t g_te ||y_te|| for the (non-padding) tokens routed to `expert`."""
        self.contribution_sum[position, expert] += float((weights.double() * outputs.double().norm(dim=-1)).sum())

    def update_contributions(
        self,
        position: int,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        outputs: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """`update_contribution` for every expert at once: the chosen experts' outputs [T, k, H]
        of one batch, their indices and weights [T, k]; `keep` masks padding."""
        # the batch's sums first, then added: the order a split calibration adds them in (distributed.py)
        self.contribution_sum[position] += self._routed_sums(top_k_index, top_k_weights, outputs, keep)

    def update_softmax_contributions(
        self, position: int, top_k_index: torch.Tensor, probs: torch.Tensor, outputs: torch.Tensor, keep: torch.Tensor
    ) -> None:
        """As `update_contributions`, weighted by the full softmax probabilities `probs` [T, E]."""
        weights = probs.to(top_k_index.device).gather(1, top_k_index)
        self.softmax_contribution_sum[position] += self._routed_sums(top_k_index, weights, outputs, keep)

    def _routed_sums(self, top_k_index, weights, outputs, keep) -> torch.Tensor:
        """[E] float64: sum over kept (token, chosen expert) pairs of weight x ||output||."""
        keep = keep.to(outputs.device)
        norms = outputs[keep].float().norm(dim=-1).double()  # norms in float32: no float64 copy of [T, k, H]
        saliency = (weights[keep].double() * norms).reshape(-1).cpu()
        index = top_k_index[keep].reshape(-1).cpu()
        return torch.zeros(self.num_experts, dtype=torch.float64).scatter_add_(0, index, saliency)

    def update_gram(self, position: int, outputs: torch.Tensor) -> None:
        """Add sum_t f_i(x_t) . f_j(x_t) of the sampled tokens' outputs of every expert [S, E, H]."""
        outputs = outputs.double()
        self.output_gram[position] += torch.einsum("seh,sfh->ef", outputs, outputs).cpu()

    def begin_expert_outputs(self) -> None:
        """Start recording the Gram matrix and the full-softmax saliency (zeroed)."""
        layers, experts = len(self.layers), self.num_experts
        self.output_gram = torch.zeros((layers, experts, experts), dtype=torch.float64)
        self.softmax_contribution_sum = torch.zeros((layers, experts), dtype=torch.float64)

    # -- accumulation ----------------------------------------------------------
    def update_shared_gate(self, position: int, gate: torch.Tensor, keep: torch.Tensor) -> None:
        """Add one batch of a layer's shared-expert gate values ([tokens], padding masked by `keep`)."""
        self.shared_gate_sum[position] += float(gate.detach().reshape(-1)[keep].double().sum())

    def update(
        self,
        position: int,
        logits: torch.Tensor,
        top_k_weights: torch.Tensor,
        top_k_index: torch.Tensor,
        keep: torch.Tensor,
        sample_rows: torch.Tensor,
        sample_slots: torch.Tensor,
    ) -> None:
        """Add one batch of one layer. `keep` masks padding; `sample_rows` (indices
        into the kept tokens) go to `sample_slots` of the sample buffer."""
        logits = logits.detach().reshape(-1, self.num_experts)[keep].double()
        weights = top_k_weights.detach().reshape(keep.shape[0], -1)[keep].double()
        index = top_k_index.detach().reshape(keep.shape[0], -1)[keep]
        self.logit_sum[position] += logits.sum(0).cpu()
        self.prob_sum[position] += torch.softmax(logits, dim=-1).sum(0).cpu()
        ones = torch.ones_like(weights)
        self.selected[position] += torch.zeros_like(logits).scatter_add_(1, index, ones).sum(0).cpu()
        self.gate_sum[position] += torch.zeros_like(logits).scatter_add_(1, index, weights).sum(0).cpu()
        if sample_rows.numel():
            self.samples[position, sample_slots] = logits[sample_rows.to(logits.device)].float().cpu()

    def record_inputs(
        self,
        position: int,
        hidden: torch.Tensor,
        keep: torch.Tensor,
        sample_rows: torch.Tensor,
        sample_slots: torch.Tensor,
    ) -> None:
        """Keep the router inputs of the sampled tokens of one batch of one layer."""
        hidden = hidden.detach().reshape(keep.shape[0], -1)[keep]
        if self.router_inputs.shape[-1] != hidden.shape[-1]:  # first batch: now the width is known
            self.router_inputs = torch.zeros(self.samples.shape[:2] + (hidden.shape[-1],))
        if sample_rows.numel():
            self.router_inputs[position, sample_slots] = hidden[sample_rows.to(hidden.device)].float().cpu()

    @property
    def has_router_inputs(self) -> bool:
        return self.router_inputs is not None and self.router_inputs.shape[1] == self.samples.shape[1] > 0

    # -- persistence -----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        tensors = {
            "logit_sum": self.logit_sum,
            "prob_sum": self.prob_sum,
            "selected": self.selected,
            "gate_sum": self.gate_sum,
            "shared_gate_sum": self.shared_gate_sum,
            "contribution_sum": self.contribution_sum,
            "samples": self.samples.contiguous(),
        }
        if self.router_inputs is not None:
            tensors["router_inputs"] = self.router_inputs.contiguous()
        for name in EXPERT_OUTPUT_SUMS:  # only when recorded: default files are as they were
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
        header = {
            "format_version": FORMAT_VERSION,
            "layers": self.layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "metadata": self.metadata,
        }
        save_file(tensors, str(path), metadata={"moe2dense": json.dumps(header)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> RouterStatistics:
        if not os.path.isfile(path):
            raise StatisticsError(f"statistics file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {})["moe2dense"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (KeyError, json.JSONDecodeError, OSError, Exception) as error:
            raise StatisticsError(f"{path} is not a mergekit-moe2dense statistics file ({error})") from None
        if header.get("format_version") != FORMAT_VERSION:
            raise StatisticsError(f"{path}: unsupported statistics format version")
        return cls(
            layers=list(header["layers"]),
            num_experts=header["num_experts"],
            top_k=header["top_k"],
            tokens=header["tokens"],
            metadata=header.get("metadata", {}),
            **tensors,
        )

    def check_model(self, fingerprint: dict[str, Any], path: str) -> None:
        """Refuse statistics recorded on another model, or on other weights of this one
        (`SourceModel.fingerprint`: the model type, its MoE layers, and every weight's content)."""
        recorded = self.metadata.get("model_fingerprint") or {}
        if recorded == fingerprint:
            return
        if "content_sha256" not in recorded:
            raise StatisticsError(
                f"statistics file {path} was written by an older version, which identified the model by its "
                "routers alone, so it cannot be checked against this model's weights; recalibrate without --stats"
            )
        if recorded.get("model_type") != fingerprint["model_type"]:
            why = f"another model type: {recorded.get('model_type')}, not {fingerprint['model_type']}"
        elif (recorded.get("layers"), recorded.get("num_experts")) != (
            fingerprint["layers"],
            fingerprint["num_experts"],
        ):
            why = (
                f"MoE layers {recorded.get('layers')} with {recorded.get('num_experts')} experts, not "
                f"{fingerprint['layers']} with {fingerprint['num_experts']}"
            )
        else:
            why = "the same architecture, but its experts or other weights differ"
        theirs = self.metadata.get("model", "an unknown model")
        raise StatisticsError(
            f"statistics file {path} was recorded on {theirs}, not on this model ({why}); recalibrate without --stats"
        )


def resolve_stats_path(path: str | os.PathLike | None) -> str | None:
    """The statistics file `--stats` names: a file as given, or in a directory (the OUT
    of an earlier run) its `moe2dense/router_stats.safetensors`, else the
    `router_stats.safetensors` that earlier versions wrote at the top of OUT."""
    if path is None or not os.path.isdir(path):
        return None if path is None else os.fspath(path)
    for name in (STATS_FILE, LEGACY_STATS_FILE):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise StatisticsError(
        f"--stats {os.fspath(path)}: directory holds neither {STATS_FILE} nor {LEGACY_STATS_FILE} "
        "(give a statistics file or the output directory of an earlier run)"
    )
