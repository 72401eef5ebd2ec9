# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""A small *trained* Mixtral-architecture MoE, built offline from text on any machine.

Why: merging experts is only meaningful on experts that differ, and random tiny models have no
learned structure to keep. This module trains one from the running Python installation, so every
machine can build the same testbed without a model hub:

* data, three domains: ``code`` (stdlib ``.py``), ``docs`` (``pydoc_data`` topics), ``c``
  (C headers), split by document into train / calib / test;
* a byte-level BPE tokenizer trained on the train split;
* an *ancestor*: a dense ``MistralForCausalLM`` trained from scratch;
* a *moe*: the ancestor sparsely upcycled into a ``MixtralForCausalLM`` (every expert a copy of
  the ancestor MLP, plus a tiny noise) and trained further with the load-balancing loss;
* a *twin*: the ancestor trained further densely on exactly the same tokens and steps;
* ``testbed_report.json``: expert drift, router frequencies and held-out perplexities.

Presets with ``family="qwen3_moe"`` (``scratch``, ``scratch-smoke``, ``scratch-hard``) are a second testbed whose
experts share no ancestor, like OLMoE's and DeepSeek-MoE's: a ``Qwen3MoeForCausalLM`` trained
from random init (with the load-balancing loss) on the same data and tokenizer recipe. They have
no ancestor (``Testbed.ancestor`` is None, ``ancestor_steps`` is 0); the *twin* is a dense
``Qwen3ForCausalLM`` of the MoE's active size (``experts_per_token * intermediate_size``) trained
from random init on exactly the same tokens and steps. See docs/results/testbeds.md.

Build times on 2 CPU cores (torch 2.13 CPU, transformers 5.24). The machine was shared with other
jobs, which slowed runs by up to 20x at the worst moments; these are the least-contended figures:

* ``smoke``: 5 s of build (13 s for the CLI with imports) with an earlier 80 + 30 steps; the
  preset now has 150 + 40 steps (~7 s expected; 197 s measured on the saturated machine). Test
  perplexity (code / docs / c), 512-token vocabulary: ancestor 83.0 / 89.2 / 83.1, MoE 75.1 /
  82.9 / 76.5, twin 75.1 / 82.8 / 76.6.
* ``example``: 115 s of build, 122 s for the CLI (ancestor 300 steps 16 s, MoE 150 steps 26 s,
  twin 150 steps 18 s, the rest data, tokenizer, saving and evaluation). Test perplexity
  (code / docs / c), 1024-token vocabulary: ancestor 53.0 / 47.8 / 48.6, MoE 43.3 / 42.1 /
  44.1, twin 44.5 / 42.2 / 43.9.
* ``benchmark``: extrapolated, not run to the end: the ancestor trains at ~4.2 steps/s
  (~4 min), a MoE step costs ~3x a dense one (~5-6 min), the twin ~1.5 min, data and evaluation
  1-2 min; ~15 min in all.

* ``scratch``: 216 s (MoE 450 steps 90 s, twin 450 steps 111 s while a test run shared the
  CPUs); ``scratch-smoke``: 10 s. Test perplexity (code / docs / c): MoE 34.2 / 34.7 / 38.9,
  twin 35.3 / 36.2 / 40.3.

* ``scratch-hard``: 63 min (data 28 s, MoE 3000 steps 44 min, twin 19 min) on the machine
  saturated by other jobs (load 7-15 on 2 cores); 190 ms per step of MoE + twin when quiet, so
  ~10-12 min expected. Test perplexity (code / docs / c): MoE 3.38 / 17.26 / 21.06, twin 3.91 /
  19.83 / 23.44. See docs/results/testbeds.md.

Fine-grained presets (``fine-qwen3``, ``fine-glm`` and their ``-smoke`` variants) are trained
from scratch the same way with 64 narrow experts, top-8: a ``Qwen3MoeForCausalLM``
(``norm_topk_prob``), and a ``Glm4MoeForCausalLM`` with GLM-4.5 / DeepSeek-V3 routing (sigmoid
scores, one shared expert, ``routed_scaling_factor``, a dense first layer, and no auxiliary loss:
``e_score_correction_bias`` is balanced by DeepSeek-V3's update after each optimiser step,
``BiasBalancer``). Each twin has the MoE's active width, ``(top-k + shared) x expert width``;
the GLM report adds ``bias_balance`` (the load spread with and without the learned bias).

* ``fine-qwen3``: 19.8 min (MoE 4000 steps 13.7 min, twin 5.4 min) with ``fine-glm`` building
  beside it, one thread each. Test perplexity (code / docs / c): MoE 3.14 / 15.52 / 20.86, twin
  3.81 / 19.73 / 24.84. ``fine-glm`` at 3000 steps: 19.0 min, MoE 3.42 / 16.46 / 22.36, twin
  3.82 / 19.20 / 21.13: the MoE ahead by 4.5% on the mean of the domains, behind on ``c``.
  ``fine-glm-long`` (6000 steps), built alone: 27.3 min (MoE 16.1, twin 10.9); MoE 2.98 / 13.00 / 20.02, twin
  3.40 / 16.02 / 18.57: the gap hardly widens (1.055 on the mean, the twin still ahead on ``c``).
  ``fine-glm-all-text`` (``fine-glm`` on all the training text: the code domain uncapped, 4.2M
  distinct tokens instead of 2.75M), built alone with two threads: 10.1 min (MoE 6.2, twin 3.6);
  MoE 3.28 / 17.58 / 25.03, twin 3.59 / 20.69 / 29.25: the MoE ahead in every domain (1.17 on
  the mean).

``report["build_seconds"]`` records the time of each phase of a build, ``report["training_tokens"]``
how many tokens each model trained on (steps x batch x seq_len; filled in from the preset when a
cached report predates it).

Checkpoints: in memory transformers 5 keeps Mixtral experts fused (``mlp.experts.gate_up_proj``
[E, 2I, H], gate rows first, and ``down_proj`` [E, H, I]); ``save_pretrained`` writes them back in
the original per-expert layout (``block_sparse_moe.experts.{e}.w1/w2/w3.weight``).

Usage::

    python benchmarks/testbed.py --preset example [--cache-dir DIR] [--force]

    from benchmarks.testbed import build_testbed
    tb = build_testbed("smoke")          # cached under $MOE2DENSE_CACHE or ~/.cache/...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

__all__ = ["Preset", "PRESETS", "Testbed", "build_testbed", "perplexity"]

DOMAINS = ("code", "docs", "c")
SPLITS = ("train", "calib", "test")
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<unk>")
Documents = list[tuple[str, str]]  # (name, text), one domain's documents
# Bump when the recipe's code changes in a way that changes the models, to invalidate caches.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Preset:
    """Everything that determines a testbed; its hash names the cache directory."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    experts_per_token: int
    seq_len: int
    batch_size: int
    ancestor_steps: int
    further_steps: int  # MoE and twin each train this many steps on the same new tokens
    ancestor_lr: float
    further_lr: float
    aux_loss_coef: float
    train_chars: int  # per domain
    eval_chars: int  # per domain, for each of calib and test
    expert_noise: float = 0.01  # relative to each expert tensor's std; breaks symmetry
    seed: int = 0
    # "mixtral": upcycled from a dense ancestor; "qwen3_moe": trained from scratch (no ancestor,
    # ancestor_steps 0; intermediate_size is each expert's). Left out of the recipe hash when
    # "mixtral", so the caches of the presets that predate it stay valid.
    family: str = "mixtral"
    # "balanced": chunk g of training comes from domain g % 3 (each domain a third of the tokens,
    # however small it is); "proportional": one shuffled pool of every domain's chunks, so a
    # small domain is not repeated more often than a large one (long runs). Left out of the
    # recipe hash when "balanced".
    mix: str = "balanced"
    # Fine-grained DeepSeek-V3 routing (``family="glm4_moe"``): ungated shared experts of the
    # routed width, the scale of the routed sum, how many first layers are dense, and gamma of
    # the auxiliary-loss-free bias update (0: no update). Left out of the recipe hash at these
    # defaults, like ``family`` and ``mix``.
    shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    first_dense_layers: int = 0
    bias_update_rate: float = 0.0


# The routing fields at their defaults are left out of the reports' presets too, so the
# reports of the presets that predate them stay as they were.
ROUTING_DEFAULTS = {"shared_experts": 0, "routed_scaling_factor": 1.0, "first_dense_layers": 0, "bias_update_rate": 0.0}
# Preset fields added after the first caches were built, with the defaults under which they
# stay out of the recipe hash (so those caches stay valid).
HASH_OPTIONAL_FIELDS = {"family": "mixtral", "mix": "balanced"} | ROUTING_DEFAULTS


# fmt: off
PRESETS = {  # build times: see the module docstring
    "smoke": Preset(
        name="smoke", vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2, seq_len=64,
        batch_size=12, ancestor_steps=150, further_steps=40, ancestor_lr=3e-3, further_lr=1e-3,
        aux_loss_coef=0.02, train_chars=150_000, eval_chars=20_000,
    ),
    "example": Preset(
        name="example", vocab_size=1024, hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=4, num_kv_heads=2, num_experts=8, experts_per_token=2, seq_len=128,
        batch_size=12, ancestor_steps=300, further_steps=150, ancestor_lr=3e-3, further_lr=1e-3,
        aux_loss_coef=0.02, train_chars=600_000, eval_chars=60_000,
    ),
    "benchmark": Preset(
        name="benchmark", vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=4,
        num_heads=4, num_kv_heads=2, num_experts=8, experts_per_token=2, seq_len=256,
        batch_size=8, ancestor_steps=1000, further_steps=500, ancestor_lr=2e-3, further_lr=1.5e-3,
        aux_loss_coef=0.02, train_chars=3_000_000, eval_chars=150_000,
    ),
    # `example` with 2 heads of 32: vLLM's CPU attention takes head sizes 32, 64, 80, ... only
    # (scripts/downstream_check.sh; every other preset has head_dim 16).
    "downstream": Preset(
        name="downstream", vocab_size=1024, hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=2, num_kv_heads=1, num_experts=8, experts_per_token=2, seq_len=128,
        batch_size=12, ancestor_steps=300, further_steps=150, ancestor_lr=3e-3, further_lr=1e-3,
        aux_loss_coef=0.02, train_chars=600_000, eval_chars=60_000,
    ),
    # From scratch: as many steps as the example's ancestor + further, all at the ancestor's lr.
    "scratch": Preset(
        name="scratch", vocab_size=1024, hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=4, num_kv_heads=2, num_experts=8, experts_per_token=2, seq_len=128,
        batch_size=12, ancestor_steps=0, further_steps=450, ancestor_lr=3e-3, further_lr=3e-3,
        aux_loss_coef=0.02, train_chars=600_000, eval_chars=60_000, family="qwen3_moe",
    ),
    "scratch-smoke": Preset(
        name="scratch-smoke", vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, num_experts=4, experts_per_token=2, seq_len=64,
        batch_size=12, ancestor_steps=0, further_steps=150, ancestor_lr=3e-3, further_lr=3e-3,
        aux_loss_coef=0.02, train_chars=150_000, eval_chars=20_000, family="qwen3_moe",
    ),
    # From scratch and trained ~13x longer than `scratch` (6.1M tokens): the MoE pulls ahead of
    # its dense twin and weight averages collapse (docs/results/testbeds.md).
    "scratch-hard": Preset(
        name="scratch-hard", vocab_size=1024, hidden_size=64, intermediate_size=256, num_layers=2,
        num_heads=4, num_kv_heads=2, num_experts=8, experts_per_token=2, seq_len=128,
        batch_size=16, ancestor_steps=0, further_steps=3000, ancestor_lr=3e-3, further_lr=3e-3,
        aux_loss_coef=0.02, train_chars=6_000_000, eval_chars=60_000, family="qwen3_moe",
        mix="proportional",
    ),
    # Fine-grained, from scratch: 64 narrow experts, top-8, twins of the active width. Qwen3-MoE
    # routing (softmax, norm_topk_prob) and GLM-4.5 / DeepSeek-V3 routing (sigmoid scores, a
    # shared expert, a dense first layer, an auxiliary-loss-free balancing bias, no aux loss).
    "fine-qwen3": Preset(
        name="fine-qwen3", vocab_size=1024, hidden_size=64, intermediate_size=32, num_layers=2,
        num_heads=4, num_kv_heads=2, num_experts=64, experts_per_token=8, seq_len=128,
        batch_size=16, ancestor_steps=0, further_steps=4000, ancestor_lr=3e-3, further_lr=3e-3,
        aux_loss_coef=0.02, train_chars=6_000_000, eval_chars=60_000, family="qwen3_moe",
        mix="proportional",
    ),
    "fine-glm": Preset(
        name="fine-glm", vocab_size=1024, hidden_size=64, intermediate_size=32, num_layers=3,
        num_heads=4, num_kv_heads=2, num_experts=64, experts_per_token=8, seq_len=128,
        batch_size=16, ancestor_steps=0, further_steps=3000, ancestor_lr=3e-3, further_lr=3e-3,
        aux_loss_coef=0.0, train_chars=6_000_000, eval_chars=60_000, family="glm4_moe",
        mix="proportional", shared_experts=1, routed_scaling_factor=2.5, first_dense_layers=1,
        bias_update_rate=1e-3,
    ),
    "fine-qwen3-smoke": Preset(
        name="fine-qwen3-smoke", vocab_size=384, hidden_size=32, intermediate_size=8, num_layers=2,
        num_heads=4, num_kv_heads=2, num_experts=64, experts_per_token=8, seq_len=64,
        batch_size=8, ancestor_steps=0, further_steps=20, ancestor_lr=3e-3, further_lr=3e-3,
        aux_loss_coef=0.02, train_chars=40_000, eval_chars=5_000, family="qwen3_moe",
    ),
    "fine-glm-smoke": Preset(
        name="fine-glm-smoke", vocab_size=384, hidden_size=32, intermediate_size=8, num_layers=3,
        num_heads=4, num_kv_heads=2, num_experts=64, experts_per_token=8, seq_len=64,
        batch_size=8, ancestor_steps=0, further_steps=20, ancestor_lr=3e-3, further_lr=3e-3,
        aux_loss_coef=0.0, train_chars=40_000, eval_chars=5_000, family="glm4_moe",
        shared_experts=1, routed_scaling_factor=2.5, first_dense_layers=1, bias_update_rate=1e-2,
    ),
}
# fine-glm trained twice as long: at 3000 steps the MoE is only 1.056x ahead of its twin
PRESETS["fine-glm-long"] = dataclasses.replace(PRESETS["fine-glm"], name="fine-glm-long", further_steps=6000)
# fine-glm on all the training text (the code domain uncapped, ~1.5 epochs instead of ~2.2): the
# MoE no longer overfits the small c and docs domains, and beats its twin in every domain
PRESETS["fine-glm-all-text"] = dataclasses.replace(PRESETS["fine-glm"], name="fine-glm-all-text", train_chars=10_000_000)
# fmt: on


@dataclass
class Testbed:
    """Paths of a complete, cached testbed and its report."""

    root: Path
    tokenizer: Path
    ancestor: Path | None  # None for presets trained from scratch
    moe: Path
    twin: Path
    calib_dir: Path
    test_dir: Path
    report: dict


# --------------------------------------------------------------------------------------- data


def collect_documents() -> dict[str, Documents]:
    """The three domains as sorted ``(name, text)`` documents from this Python installation."""
    from pydoc_data.topics import topics

    paths = sysconfig.get_paths()
    stdlib, include = Path(paths["stdlib"]), Path(paths["include"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    code = [p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts[:-1])]
    return {
        "code": sorted((str(p.relative_to(stdlib)), _read(p)) for p in code),
        "docs": sorted(topics.items()),
        "c": sorted((str(p.relative_to(include)), _read(p)) for p in include.rglob("*.h")),
    }


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def split_of(domain: str, name: str) -> str:
    """Deterministic split of a document from a hash of its name: 80% train, 10% calib, 10% test."""
    bucket = int(hashlib.sha256(f"{domain}/{name}".encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else "calib" if bucket == 8 else "test"


def split_documents(documents: dict[str, Documents], preset: Preset) -> dict[str, dict[str, Documents]]:
    """``splits[split][domain]`` -> documents, in hash order, capped at the preset's size.

    Hash order (not name order) so that a cap samples the whole domain, not its first folders.
    The last document that crosses the cap is truncated to fit.
    """
    caps = {"train": preset.train_chars, "calib": preset.eval_chars, "test": preset.eval_chars}
    splits = {split: {d: [] for d in DOMAINS} for split in SPLITS}
    for domain, docs in documents.items():
        used = dict.fromkeys(SPLITS, 0)
        for name, text in sorted(docs, key=lambda doc: hashlib.sha256(doc[0].encode()).digest()):
            split = split_of(domain, name)
            room = caps[split] - used[split]
            if room > 0 and text.strip():
                splits[split][domain].append((name, text[:room]))
                used[split] += len(text[:room])
    return splits


def join(docs: Documents) -> str:
    """A split as one text, documents separated by blank lines: the format of the data files."""
    return "\n\n".join(text.strip("\n") for _, text in docs) + "\n"


# ---------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown bytes, like GPT-2/Llama-3) trained on the train split."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """Token ids of a split's text file, one stream (documents already blank-line separated)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` windows of a stream; the tail is dropped."""
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


class Batches:
    """Domain-balanced training batches: chunk ``g`` is from domain ``g % 3``.

    A global chunk counter means the ancestor and the further phase read disjoint tokens (as far
    as the data lasts, then they cycle) and the MoE and the twin read exactly the same ones.
    """

    def __init__(self, chunks: list[torch.Tensor], batch_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.chunks = [c[torch.randperm(len(c), generator=g)] for c in chunks]
        self.batch_size = batch_size

    def batch(self, step: int) -> torch.Tensor:
        rows = []
        for g in range(step * self.batch_size, (step + 1) * self.batch_size):
            domain = self.chunks[g % len(self.chunks)]
            rows.append(domain[(g // len(self.chunks)) % len(domain)])
        return torch.stack(rows)


# ------------------------------------------------------------------------------------- models


def ancestor_config(preset: Preset, tokenizer) -> MistralConfig:
    return MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        head_dim=preset.hidden_size // preset.num_heads,
        max_position_embeddings=preset.seq_len,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def moe_config(preset: Preset, dense: MistralConfig) -> MixtralConfig:
    """The ancestor's config with its MLP replaced by ``num_experts`` experts of the same size."""
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "sliding_window",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    return MixtralConfig(
        **{k: getattr(dense, k) for k in keys},
        num_local_experts=preset.num_experts,
        num_experts_per_tok=preset.experts_per_token,
        router_aux_loss_coef=preset.aux_loss_coef,
        output_router_logits=False,
    )


def scratch_configs(preset: Preset, dense: MistralConfig) -> tuple[Qwen3MoeConfig, Qwen3Config]:
    """A Qwen3-MoE with every layer sparse, and the dense Qwen3 of its active size."""
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    shared = {k: getattr(dense, k) for k in keys}
    moe = Qwen3MoeConfig(
        **shared,
        intermediate_size=preset.intermediate_size,  # unused: no dense layers
        moe_intermediate_size=preset.intermediate_size,
        num_experts=preset.num_experts,
        num_experts_per_tok=preset.experts_per_token,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=preset.aux_loss_coef,
        output_router_logits=False,
    )
    twin = Qwen3Config(**shared, intermediate_size=preset.experts_per_token * preset.intermediate_size)
    return moe, twin


def glm_configs(preset: Preset, dense: MistralConfig) -> tuple[Glm4MoeConfig, Glm4MoeConfig]:
    """A GLM-4.5 MoE (DeepSeek-V3 routing, first layers dense) and its all-dense twin.

    The dense layers of both have the MoE's active width, ``(top-k + shared) x expert width``,
    so the twin is the MoE's active path with every layer dense. One expert group (``n_group``
    1), as in GLM-4.5: DeepSeek-V3's group limit bounds cross-device traffic, which a model
    on one CPU does not have.
    """
    keys = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    active = (preset.experts_per_token + preset.shared_experts) * preset.intermediate_size
    shared = {k: getattr(dense, k) for k in keys} | {"intermediate_size": active}
    shared |= {
        "moe_intermediate_size": preset.intermediate_size,
        "n_routed_experts": preset.num_experts,
        "num_experts_per_tok": preset.experts_per_token,
        "n_shared_experts": preset.shared_experts,
        "routed_scaling_factor": preset.routed_scaling_factor,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "num_nextn_predict_layers": 0,
    }
    moe = Glm4MoeConfig(**shared, first_k_dense_replace=preset.first_dense_layers)
    return moe, Glm4MoeConfig(**shared, first_k_dense_replace=preset.num_layers)


# ---------------------------------------------------------------------- aux-loss-free balancing


def balanced_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free update: ``b_e + rate * sign(mean load - load_e)``.

    ``counts[e]`` is how many top-k selections expert ``e`` got in the last step: an overloaded
    expert's bias falls and an idle one's rises, so the choice (scores + bias) evens out
    without a loss term that would pull on the router's scores.
    """
    return bias + rate * torch.sign(counts.float().mean() - counts.float())


def bias_routers(model) -> list[torch.nn.Module]:
    """The top-k routers that carry a choice-only bias (DeepSeek-V3 style), in layer order."""
    return [m for m in model.modules() if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor)]


class SelectionCounter:
    """Counts each router's top-k selections per expert while active; hooks removed on exit.

    The routers return ``(logits, weights, indices)``; the count reads the indices, which are
    the choice actually made (bias and expert groups included), unlike a top-k of the logits.
    """

    def __init__(self, model):
        self.routers = bias_routers(model)
        self.counts = [torch.zeros(r.e_score_correction_bias.numel()) for r in self.routers]
        self._handles = []

    def __enter__(self) -> SelectionCounter:
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def _hook(self, layer: int):
        def count(module, args, output):
            self.counts[layer] += torch.bincount(output[2].flatten(), minlength=len(self.counts[layer]))

        return count

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def frequencies(self) -> list[list[float]]:
        """Per router, the fraction of selections each expert got."""
        return [(c / c.sum()).tolist() for c in self.counts]


class BiasBalancer(SelectionCounter):
    """Counts the selections of a training step, then moves each router's bias toward balance.

    ``step()`` is called after each optimiser step; the bias is a buffer, not a parameter, so
    the optimiser never touches it.
    """

    def __init__(self, model, rate: float):
        super().__init__(model)
        self.rate = rate

    @torch.no_grad()
    def step(self) -> None:
        for router, counts in zip(self.routers, self.counts):
            bias = router.e_score_correction_bias
            bias.copy_(balanced_bias(bias, counts, self.rate))
            counts.zero_()


# family -> (configs of the MoE and its twin, MoE class, twin class), for presets from scratch
SCRATCH_FAMILIES = {
    "qwen3_moe": (scratch_configs, Qwen3MoeForCausalLM, Qwen3ForCausalLM),
    "glm4_moe": (glm_configs, Glm4MoeForCausalLM, Glm4MoeForCausalLM),
}


def upcycle(ancestor: MistralForCausalLM, preset: Preset) -> MixtralForCausalLM:
    """Sparse upcycling (Komatsuzaki et al., 2022): every expert starts as the ancestor's MLP.

    Non-MLP weights are copied unchanged; routers get a small random init; a tiny noise on each
    expert breaks the symmetry so that the load-balancing loss can pull experts apart.
    """
    moe = MixtralForCausalLM(moe_config(preset, ancestor.config))
    dense = ancestor.state_dict()
    state = moe.state_dict()
    for name, value in dense.items():
        if ".mlp." not in name:
            state[name] = value.clone()
    for layer in range(preset.num_layers):
        mlp = f"model.layers.{layer}.mlp"
        gate_up = torch.cat([dense[f"{mlp}.gate_proj.weight"], dense[f"{mlp}.up_proj.weight"]])
        down = dense[f"{mlp}.down_proj.weight"]
        for key, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
            experts = weight.expand(preset.num_experts, *weight.shape)
            noise = preset.expert_noise * weight.std() * torch.randn_like(experts)
            state[f"{mlp}.experts.{key}"] = experts + noise
        state[f"{mlp}.gate.weight"] = 0.02 * torch.randn(preset.num_experts, preset.hidden_size)
    moe.load_state_dict(state)
    return moe


def train(
    model,
    batches: Batches,
    first_step: int,
    steps: int,
    lr: float,
    desc: str,
    after_step: Callable[[], None] | None = None,
) -> float:
    """AdamW with linear warmup and cosine decay; causal LM loss (+ router aux loss for MoE).

    ``after_step`` runs after each optimiser step (the aux-loss-free bias update). Returns the
    mean loss of the last 10% of steps.
    """
    is_moe = isinstance(model, (MixtralForCausalLM, Qwen3MoeForCausalLM))
    extra = {"output_router_logits": True} if is_moe else {}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10%
        return min((step + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses = []
    for step in (bar := tqdm(range(steps), desc=desc, file=sys.stderr)):
        ids = batches.batch(first_step + step)
        loss = model(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return sum(tail) / len(tail)


# ------------------------------------------------------------------------------------- report


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of a token stream."""
    model.eval()
    data = windows(ids, seq_len)
    nll, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def _mean_offdiag_cosine(x: torch.Tensor) -> float:
    x = F.normalize(x, dim=1)
    sim = x @ x.T
    n = len(x)
    return ((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item()


@torch.no_grad()
def expert_drift(moe, ancestor: MistralForCausalLM | None) -> dict:
    """Per layer: mean pairwise cosine between experts, and mean cosine of experts to the ancestor.

    Each expert is flattened as [gate; up; down], the same order as the ancestor's MLP. Right
    after upcycling both are ~1; further training lowers them as experts specialise. Without an
    ancestor (trained from scratch) only the pairwise cosine is reported.
    """
    pairwise, to_ancestor = [], []
    for layer, moe_layer in enumerate(moe.model.layers):
        experts = getattr(moe_layer.mlp, "experts", None)
        if experts is None:  # a dense layer (GLM-4.5's first layers)
            continue
        flat = torch.cat([experts.gate_up_proj.flatten(1), experts.down_proj.flatten(1)], dim=1)
        pairwise.append(_mean_offdiag_cosine(flat))
        if ancestor is None:
            continue
        mlp = ancestor.model.layers[layer].mlp
        dense = torch.cat(
            [mlp.gate_proj.weight.flatten(), mlp.up_proj.weight.flatten(), mlp.down_proj.weight.flatten()]
        )
        to_ancestor.append(F.cosine_similarity(flat, dense[None], dim=1).mean().item())
    drift = {"expert_pairwise_cosine": pairwise}
    if ancestor is not None:
        drift["expert_to_ancestor_cosine"] = to_ancestor
    return drift


@torch.no_grad()
def router_frequency(moe, ids: torch.Tensor, seq_len: int) -> list[list[float]]:
    """Per layer, the fraction of top-k selections that went to each expert."""
    k, n = moe.config.num_experts_per_tok, moe.config.num_local_experts
    counts = torch.zeros(moe.config.num_hidden_layers, n)
    data = windows(ids, seq_len)
    for start in range(0, len(data), 16):
        logits = moe(input_ids=data[start : start + 16], output_router_logits=True).router_logits
        for layer, layer_logits in enumerate(logits):
            chosen = layer_logits.topk(k, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(chosen, minlength=n)
    return (counts / counts.sum(dim=1, keepdim=True)).tolist()


@torch.no_grad()
def selection_frequency(moe, ids: torch.Tensor, seq_len: int) -> list[list[float]]:
    """Per MoE layer, the fraction of the routers' actual top-k choices that went to each expert.

    For routers whose choice is not a top-k of their logits (a balancing bias, expert groups);
    dense layers have no router and no row.
    """
    data = windows(ids, seq_len)
    with SelectionCounter(moe) as counter:
        for start in range(0, len(data), 16):
            moe(input_ids=data[start : start + 16])
    return counter.frequencies()


def load_spread(frequencies: list[float]) -> float:
    """Coefficient of variation of the experts' shares: 0 when perfectly balanced."""
    shares = torch.tensor(frequencies)
    return (shares.std(unbiased=False) / shares.mean()).item()


@torch.no_grad()
def bias_balance(moe, ids: torch.Tensor, seq_len: int) -> dict:
    """What the learned balancing bias does: per MoE layer, the bias and the load spread of the
    routers' choices with it and with it set to zero (the same scores, no correction)."""
    biases = [r.e_score_correction_bias.clone() for r in bias_routers(moe)]
    with_bias = selection_frequency(moe, ids, seq_len)
    try:
        for router in bias_routers(moe):
            router.e_score_correction_bias.zero_()
        without_bias = selection_frequency(moe, ids, seq_len)
    finally:
        for router, bias in zip(bias_routers(moe), biases):
            router.e_score_correction_bias.copy_(bias)
    return {
        "bias": [b.tolist() for b in biases],
        "spread_with_bias": [load_spread(f) for f in with_bias],
        "spread_without_bias": [load_spread(f) for f in without_bias],
        "frequency_without_bias": without_bias,
    }


# -------------------------------------------------------------------------------------- build


def recipe_hash(preset: Preset) -> str:
    """Short hash of everything the build depends on: preset, recipe version, Python's sources."""
    fields = dataclasses.asdict(preset)
    for key, default in HASH_OPTIONAL_FIELDS.items():
        if fields[key] == default:  # fields added later: absent from the hashes that predate them
            del fields[key]
    recipe = {"preset": fields, "version": RECIPE_VERSION, "python": sys.version}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def default_cache_dir() -> Path:
    env = os.environ.get("MOE2DENSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergekit-moe2dense" / "testbed"


def training_tokens(preset: Preset) -> dict[str, int]:
    """Tokens each model trained on (steps x batch x seq_len); the MoE's and the twin's are the same."""
    per_step = preset.batch_size * preset.seq_len
    tokens = {"moe": preset.further_steps * per_step, "twin": preset.further_steps * per_step}
    if preset.family == "mixtral":  # the MoE and twin continue from the ancestor's tokens
        tokens = {"ancestor": preset.ancestor_steps * per_step, "moe_after_ancestor": tokens["moe"]} | tokens
        tokens["moe"] = tokens["twin"] = tokens["ancestor"] + tokens["moe_after_ancestor"]
    return tokens


def _testbed(root: Path) -> Testbed:
    report = json.loads((root / "testbed_report.json").read_text())
    if "training_tokens" not in report:  # reports written before it was recorded
        report["training_tokens"] = training_tokens(Preset(**report["preset"]))
    return Testbed(
        root=root,
        tokenizer=root / "tokenizer",
        ancestor=root / "ancestor" if (root / "ancestor").exists() else None,
        moe=root / "moe",
        twin=root / "twin",
        calib_dir=root / "data" / "calib",
        test_dir=root / "data" / "test",
        report=report,
    )


def build_testbed(preset: str | Preset, cache_dir: str | Path | None = None, force: bool = False) -> Testbed:
    """Build (or reuse) the testbed at ``<cache_dir>/<preset>-<recipe hash>``.

    The build goes to a temporary sibling directory that is renamed into place only when
    complete, so an interrupted build never looks complete.
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = base / f"{preset.name}-{recipe_hash(preset)}"
    if (root / "testbed_report.json").exists() and not force:
        return _testbed(root)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=base))
    try:
        _build(preset, tmp)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _testbed(root)


def _build(preset: Preset, out: Path) -> None:
    """The whole recipe: data -> tokenizer -> ancestor -> MoE and twin -> report.

    From scratch (``family`` ``qwen3_moe`` or ``glm4_moe``) there is no ancestor: the MoE and
    the dense twin start from random init and train on the same tokens.
    """
    seconds, start = {}, time.time()  # wall time per phase, in the report
    torch.manual_seed(preset.seed)
    data = _prepare_data(preset, out)
    seconds["data_and_tokenizer"] = time.time() - start
    models, losses = _train_models(preset, data, seconds, start)
    for name, model in models.items():
        model.save_pretrained(out / name)
        data.tokenizer.save_pretrained(out / name)
    report = _report(preset, data, models, losses)
    seconds["save_and_report"] = time.time() - start - sum(seconds.values())
    report["build_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    report["build_seconds"]["total"] = round(time.time() - start, 1)
    (out / "testbed_report.json").write_text(json.dumps(report, indent=2))


@dataclass
class _Data:
    """A build's data: the documents of each split, the tokenizer, token streams and batches."""

    splits: dict[str, dict[str, Documents]]
    tokenizer: PreTrainedTokenizerFast
    ids: dict[tuple[str, str], torch.Tensor]  # (split, domain) -> token stream
    batches: Batches


def _prepare_data(preset: Preset, out: Path) -> _Data:
    """Split the documents, write the calib / test files, train the tokenizer, make batches."""
    splits = split_documents(collect_documents(), preset)
    names = {s: {d: [name for name, _ in splits[s][d]] for d in DOMAINS} for s in SPLITS}
    (out / "data").mkdir()
    (out / "data" / "documents.json").write_text(json.dumps(names, indent=1))
    texts = {(split, d): join(splits[split][d]) for split in SPLITS for d in DOMAINS}
    for (split, domain), text in texts.items():
        if split != "train":  # calibration and evaluation read these files
            (out / "data" / split).mkdir(exist_ok=True)
            (out / "data" / split / f"{domain}.txt").write_text(text, encoding="utf-8")

    train_docs = [text for d in DOMAINS for _, text in splits["train"][d]]
    tokenizer = train_tokenizer(train_docs, preset.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")
    ids = {key: encode(tokenizer, text) for key, text in texts.items()}
    chunks = [windows(ids["train", d], preset.seq_len) for d in DOMAINS]
    if preset.mix == "proportional":
        chunks = [torch.cat(chunks)]
    elif preset.mix != "balanced":
        raise ValueError(f"preset {preset.name}: unknown mix {preset.mix!r}")
    return _Data(splits, tokenizer, ids, Batches(chunks, preset.batch_size, preset.seed))


def _train_models(preset: Preset, data: _Data, seconds: dict, start: float) -> tuple[dict, dict]:
    """Train the ancestor (upcycled presets), then the MoE and the twin on the same tokens.

    Returns the models by name (no ``ancestor`` from scratch) and their final training losses;
    adds each phase's wall time to ``seconds``.
    """
    losses, ancestor = {}, None
    if preset.family == "mixtral":
        ancestor = MistralForCausalLM(ancestor_config(preset, data.tokenizer))
        losses["ancestor"] = train(ancestor, data.batches, 0, preset.ancestor_steps, preset.ancestor_lr, "ancestor")
        seconds["ancestor"] = time.time() - start - sum(seconds.values())
        moe = upcycle(ancestor, preset)
        twin = MistralForCausalLM(ancestor.config)
        twin.load_state_dict(ancestor.state_dict())
    elif preset.family in SCRATCH_FAMILIES and preset.ancestor_steps == 0:
        make_configs, moe_class, twin_class = SCRATCH_FAMILIES[preset.family]
        moe_cfg, twin_cfg = make_configs(preset, ancestor_config(preset, data.tokenizer))
        moe, twin = moe_class(moe_cfg), twin_class(twin_cfg)
    else:
        raise ValueError(f"preset {preset.name}: unknown family {preset.family!r} or ancestor steps")
    for name, model in (("moe", moe), ("twin", twin)):
        balancer = BiasBalancer(model, preset.bias_update_rate) if name == "moe" and preset.bias_update_rate else None
        with balancer or contextlib.nullcontext():
            losses[name] = train(
                model,
                data.batches,
                preset.ancestor_steps,
                preset.further_steps,
                preset.further_lr,
                name,
                after_step=balancer.step if balancer else None,
            )
        seconds[name] = time.time() - start - sum(seconds.values())
    models = {"ancestor": ancestor, "moe": moe, "twin": twin}
    return {name: model for name, model in models.items() if model is not None}, losses


def recorded_preset(preset: Preset) -> dict:
    """The preset as the report records it: every field but the routing ones at their defaults."""
    fields = dataclasses.asdict(preset)
    return {k: v for k, v in fields.items() if k not in ROUTING_DEFAULTS or v != ROUTING_DEFAULTS[k]}


def _report(preset: Preset, data: _Data, models: dict, losses: dict) -> dict:
    """The testbed's report: data sizes, losses, expert drift, routing and test perplexities."""
    splits, ids, moe = data.splits, data.ids, models["moe"]
    frequency = selection_frequency if preset.family == "glm4_moe" else router_frequency
    report = {
        "preset": recorded_preset(preset),
        "recipe_hash": recipe_hash(preset),
        "vocab_size": len(data.tokenizer),
        "data": {s: {d: {"documents": len(splits[s][d]), "tokens": len(ids[s, d])} for d in DOMAINS} for s in SPLITS},
        "training_tokens": training_tokens(preset),
        "final_train_loss": losses,
        "drift": expert_drift(moe, models.get("ancestor")),
        "router_frequency": {d: frequency(moe, ids["calib", d], preset.seq_len) for d in DOMAINS},
        "perplexity": {
            name: {d: perplexity(model, ids["test", d], preset.seq_len) for d in DOMAINS}
            for name, model in models.items()
        },
    }
    if preset.bias_update_rate:
        calib = torch.cat([ids["calib", d] for d in DOMAINS])
        report["bias_balance"] = bias_balance(moe, calib, preset.seq_len)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="example")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    tb = build_testbed(args.preset, args.cache_dir, args.force)
    for field in ("root", "tokenizer", "ancestor", "moe", "twin", "calib_dir", "test_dir"):
        print(f"{field:10s} {getattr(tb, field)}")
    print(json.dumps(tb.report, indent=2))


if __name__ == "__main__":
    main()
