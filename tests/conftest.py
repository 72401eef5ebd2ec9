# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Tiny real models, built from transformers configs, shared by the tests."""

from __future__ import annotations

import os

# One thread per process: several tests start child processes (console scripts,
# torchrun ranks) on a 2-core CI machine, and oversubscribed OpenMP threads slow
# tiny models down by an order of magnitude. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

TEXT = (
    "def merge(experts, weights):\n    return sum(w * e for w, e in zip(weights, experts))\n\n\n"
    "The router assigns every token to two of the eight experts of each layer.\n\n\n"
    "#include <stdio.h>\nint main(void) { printf(\"hello\\n\"); return 0; }\n\n\n"
) * 4


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib")
    (path / "mixed.txt").write_text(TEXT)
    return path


def tiny_mixtral_config(vocab_size: int, **overrides) -> transformers.MixtralConfig:
    values = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return transformers.MixtralConfig(**values)


def make_mixtral(
    path: Path,
    tokenizer_dir: Path,
    *,
    identical: bool = False,
    layout: str = "legacy",
    seed: int = 0,
    upcycle_noise: float = 0.0,
    **config_overrides,
) -> Path:
    """Save a random tiny Mixtral; `identical` copies expert 0 into every expert, and
    `upcycle_noise` then adds independent noise of that relative size to each (sparse upcycling)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = tiny_mixtral_config(len(tokenizer), **config_overrides)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            # A larger init than the default 0.02 so that merges that are wrong show.
            experts.gate_up_proj.normal_(0, 0.2)
            experts.down_proj.normal_(0, 0.2)
            layer.mlp.gate.weight.normal_(0, 0.5)
            if identical:
                experts.gate_up_proj[:] = experts.gate_up_proj[0].clone()
                experts.down_proj[:] = experts.down_proj[0].clone()
            for weight in (experts.gate_up_proj, experts.down_proj):
                weight.add_(upcycle_noise * weight.std() * torch.randn_like(weight))
    return save_model(model, tokenizer, path, layout)


def save_model(model, tokenizer, path: Path, layout: str) -> Path:
    """`legacy`: what save_pretrained writes (per-expert names); `fused`: the names
    transformers 5 keeps in memory, as some checkpoints store them."""
    path.mkdir(parents=True, exist_ok=True)
    if layout == "legacy":
        model.save_pretrained(path)
    else:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def identical_moe(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("identical")
    return {
        layout: make_mixtral(root / layout, tokenizer_dir, identical=True, layout=layout)
        for layout in ("legacy", "fused")
    }


@pytest.fixture(scope="session")
def random_moe(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("random")
    return {
        layout: make_mixtral(root / layout, tokenizer_dir, layout=layout, seed=1)
        for layout in ("legacy", "fused")
    }


def logits_of(path, input_ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="session")
def smoke_testbed(tmp_path_factory):
    """The trained smoke testbed (benchmarks/testbed.py), built once per session."""
    from benchmarks.testbed import build_testbed

    return build_testbed("smoke", cache_dir=tmp_path_factory.mktemp("testbed"))
