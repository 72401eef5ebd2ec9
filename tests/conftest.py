# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The tests' shared fixtures: a tokenizer, calibration text, tiny MoEs, the trained testbed.

Plain helpers are in helpers.py."""

from __future__ import annotations

import os

# One thread per process: several tests start child processes (console scripts,
# torchrun ranks) on a 2-core CI machine, and oversubscribed OpenMP threads slow
# tiny models down by an order of magnitude. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import transformers

from helpers import TEXT, make_mixtral


@pytest.fixture(autouse=True)
def _onednn_cache_variable_restored():
    """A conversion sets ONEDNN_PRIMITIVE_CACHE_CAPACITY in this process (memory.py): undone
    after each test, so that later tests' child processes (heal, eval) start as a user's would."""
    before = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    yield
    if before is None:
        os.environ.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    else:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = before


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    return {layout: make_mixtral(root / layout, tokenizer_dir, layout=layout, seed=1) for layout in ("legacy", "fused")}


@pytest.fixture(scope="session")
def smoke_testbed(tmp_path_factory):
    """The trained smoke testbed (benchmarks/testbed.py), built once per session."""
    from benchmarks.testbed import build_testbed

    return build_testbed("smoke", cache_dir=tmp_path_factory.mktemp("testbed"))
