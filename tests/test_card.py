# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The model card names a Hub base model only when the source is a Hub id."""

from __future__ import annotations

from mergekit_moe2dense.card import _write_card
from mergekit_moe2dense.config import Moe2DenseConfig


def _card(tmp_path, model: str) -> str:
    config = Moe2DenseConfig.model_validate({"merge_method": "expert_uniform", "models": [{"model": model}]})
    _write_card(str(tmp_path), config, "merge", "body", None)
    return (tmp_path / "README.md").read_text()


def test_local_source_has_no_base_model(tmp_path):
    source = tmp_path / "moe"
    source.mkdir()
    card = _card(tmp_path, str(source))
    assert "base_model" not in card and "# " in card


def test_hub_source_is_the_base_model(tmp_path):
    card = _card(tmp_path, "mistralai/Mixtral-8x7B-v0.1")
    assert "base_model: mistralai/Mixtral-8x7B-v0.1\n---" in card
    assert "github.com/arcee-ai/mergekit-moe2dense" not in card
