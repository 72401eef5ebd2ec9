# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The calibration pass's parts: hooks on the routers, the token sample, and loading.

`RouterRecorder` owns the hooks that record router statistics while the MoE runs;
`TokenSample` and `sample_token_ids` fix which tokens' router logits are kept;
`load_calibration_batches` tokenizes once per run and `load_moe` loads the whole
model for the full engine. The collectors that run the forward over these
(`engine.collect_statistics`, split over ranks by `distributed.RankShare`) live
with the entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from mergekit_moe2dense.calibration.batches import TokenBatch, calibration_sequences, pad_batches
from mergekit_moe2dense.data import DataError, load_documents
from mergekit_moe2dense.families import MoEFamily
from mergekit_moe2dense.statistics import RouterStatistics


class RouterRecorder:
    """Owns the forward hooks on every router; removes them on exit.

    Before each forward, `begin_batch` tells it which tokens are padding and which
    kept tokens belong to the fixed sample, so every layer records the same ones.
    """

    def __init__(self, model: torch.nn.Module, family: MoEFamily, stats: RouterStatistics, sample_ids: torch.Tensor):
        self.model = model
        self.family = family
        self.stats = stats
        self.sample_ids = sample_ids  # sorted global indices of kept tokens to sample
        self.offset = 0  # kept tokens seen before the current batch
        self._keep: torch.Tensor | None = None
        self._rows = self._slots = None
        self._handles = []
        # experts modules whose forward records contributions, with the instance's own forward if any
        self._recording: list[tuple[torch.nn.Module, Callable | None]] = []
        self._counting = True
        self._probs: dict[int, torch.Tensor] = {}  # full softmax of the current batch, per layer

    def __enter__(self) -> RouterRecorder:
        for position, layer in enumerate(self.stats.layers):
            module = self.model.get_submodule(self.family.router_module(layer))
            self._handles.append(module.register_forward_hook(self._hook(position)))
            gate = self.family.shared_gate_module(layer)
            if gate is not None:
                module = self.model.get_submodule(gate)
                self._handles.append(module.register_forward_hook(self._shared_gate_hook(position)))
            experts = self.model.get_submodule(self.family.experts_module(layer))
            if self.family.contributions_in_forward:
                # an instance's own forward (accelerate's hooks under a device_map) is wrapped, and kept
                self._recording.append((experts, vars(experts).get("forward")))
                experts.forward = self._recording_forward(position, experts.forward)
            else:
                self._handles.append(experts.register_forward_hook(self._contribution_hook(position)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for experts, own in self._recording:
            if own is None:
                del experts.forward  # the class's own again
            else:
                experts.forward = own
        self._recording.clear()

    def _hook(self, position: int):
        def hook(_module, inputs, output):
            logits, weights, index = self.family.router_outputs(output)
            self.stats.update(position, logits, weights, index, self._keep, self._rows, self._slots)
            if self.stats.router_inputs is not None:
                self.stats.record_inputs(position, inputs[0], self._keep, self._rows, self._slots)
            if self.stats.output_gram is not None:  # for the experts' forward of this layer
                self._probs[position] = torch.softmax(logits.detach().reshape(-1, self.stats.num_experts).double(), -1)

        return hook

    def _shared_gate_hook(self, position: int):
        def hook(_module, _inputs, output):
            self.stats.update_shared_gate(position, self.family.shared_gate_values(output), self._keep)

        return hook

    def rewind(self) -> None:
        """Start the same batches again at the next layer (the layer-streamed pass
        runs every batch once per layer); tokens are counted on the first pass only."""
        self.offset = 0
        self._counting = False

    def _recording_forward(self, position: int, forward: Callable) -> Callable:
        """The experts module's own forward, computing each routed expert's output once.

        Expert contributions need each chosen expert's own output, which the fused experts
        module sums away. Its forward is linear in the top-k weights, so it runs on every
        (token, chosen expert) pair as a token of its own with weight 1, which gives those
        outputs [T, k, H]; the block's output is then their weighted sum. With transformers'
        grouped experts this is the very computation it does (the same rows, sorted the same
        way, weighted and summed in the same order): the calibrated forward is unchanged, and
        the experts are computed once, not again in a hook (31% of a streamed calibration)."""

        def recording(hidden, top_k_index, top_k_weights, *args, **kwargs):
            tokens, k = top_k_index.shape
            ones = torch.ones_like(top_k_weights).reshape(-1, 1)
            outputs = forward(hidden.repeat_interleave(k, dim=0), top_k_index.reshape(-1, 1), ones, *args, **kwargs)
            outputs = outputs.view(tokens, k, -1)
            self.stats.update_contributions(position, top_k_index, top_k_weights, outputs, self._keep)
            if self.stats.output_gram is not None:  # asked for by a diversity or reap_softmax score
                probs = self._probs.pop(position)
                self.stats.update_softmax_contributions(position, top_k_index, probs, outputs, self._keep)
                self._record_gram(position, forward, hidden, top_k_weights.dtype, *args, **kwargs)
            return (outputs * top_k_weights.unsqueeze(-1)).sum(dim=1).to(hidden.dtype)

        return recording

    def _record_gram(self, position: int, forward: Callable, hidden, dtype, *args, **kwargs) -> None:
        """The Gram matrix of every expert's output on this batch's sampled tokens: the
        experts' forward with each sampled token once per expert, at weight 1."""
        if not self._rows.numel():
            return
        sampled = hidden[self._keep.to(hidden.device)][self._rows.to(hidden.device)]
        count, experts = sampled.shape[0], self.stats.num_experts
        index = torch.arange(experts, device=hidden.device).repeat(count).reshape(-1, 1)
        ones = torch.ones(index.shape, dtype=dtype, device=hidden.device)
        every = forward(sampled.repeat_interleave(experts, dim=0), index, ones, *args, **kwargs)
        self.stats.update_gram(position, every.view(count, experts, -1))

    def _contribution_hook(self, position: int):
        """Expert contributions of a family whose experts' forward is not linear in the top-k
        weights (`contributions_in_forward` false: Llama 4 scales the experts' inputs):
        recomputed from its inputs, which doubles the cost of the sparse MLPs."""

        def hook(module, inputs, _output):
            for expert, weights, outputs in self.family.expert_contributions(module, inputs, self._keep):
                self.stats.update_contribution(position, expert, weights, outputs)

        return hook

    def begin_batch(self, batch: TokenBatch) -> None:
        self._keep = batch.attention_mask.reshape(-1).bool()
        kept = int(self._keep.sum())
        lo = torch.searchsorted(self.sample_ids, self.offset)
        hi = torch.searchsorted(self.sample_ids, self.offset + kept)
        self._slots = torch.arange(lo, hi)
        self._rows = self.sample_ids[lo:hi] - self.offset
        self.offset += kept
        if self._counting:
            self.stats.tokens += kept


def load_calibration_batches(model_path: str, calibration, tokenizer=None) -> tuple:
    """(sequences, padded batches) of `calibration`'s text; tokenize once per run and give
    the same batches to the statistics and the re-fit."""
    tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(model_path)
    try:
        documents = load_documents(calibration.dataset, text_field=calibration.text_field, split=calibration.split)
    except DataError as error:
        raise DataError(f"calibration dataset: {error}") from None
    sequences = calibration_sequences(
        documents,
        tokenizer,
        num_samples=calibration.num_samples,
        seq_len=calibration.seq_len,
        seed=calibration.seed,
    )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return sequences, list(pad_batches(sequences, calibration.batch_size, pad_id))


@dataclass(frozen=True)
class TokenSample:
    """Which tokens' router logits the statistics keep: `max_token_samples` of them drawn with
    `seed` over the whole calibration set, and with `router_inputs` the routers' inputs of the
    same tokens; with `expert_outputs` the Gram matrix of every expert's output on them and
    the full-softmax saliency (`RouterStatistics.begin_expert_outputs`)."""

    max_token_samples: int
    seed: int = 0
    router_inputs: bool = False
    expert_outputs: bool = False


def sample_token_ids(kept_per_batch: list[int], max_token_samples: int, seed: int) -> torch.Tensor:
    """Sorted global indices (over all batches' non-padding tokens) of the sampled tokens.

    Defined on the whole calibration set, so any split of the batches across
    processes samples the same tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(sum(kept_per_batch), generator=generator)[:max_token_samples].sort().values


def _empty_statistics(config, family: MoEFamily, batches, max_token_samples: int, seed: int):
    """(zeroed statistics of `config`'s MoE layers with the sample buffer, the sampled token
    ids, the number of non-padding tokens in `batches`)."""
    stats = RouterStatistics(
        layers=family.moe_layer_indices(config),
        num_experts=family.num_experts(config),
        top_k=family.top_k(config),
    )
    total = sum(int(b.attention_mask.sum()) for b in batches)
    sample_ids = sample_token_ids([total], max_token_samples, seed)
    stats.samples = torch.zeros((len(stats.layers), len(sample_ids), stats.num_experts))
    return stats, sample_ids, total


def load_moe(model_path: str, *, device: str, dtype: torch.dtype, device_map=None) -> torch.nn.Module:
    """The whole MoE on `device`, or placed by accelerate's `device_map` (layers spread over
    the visible GPUs, then CPU; accelerate's hooks move activations between them)."""
    if device_map is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device_map)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.to(device)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the token ids go: the embeddings' device (the first device of a device map)."""
    return model.get_input_embeddings().weight.device
