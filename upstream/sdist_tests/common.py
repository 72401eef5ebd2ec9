# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`tests/common.py` for mergekit's source distribution, which ships the tests that import it but not it.

scripts/upstream_check.sh copies this file (and an empty `__init__.py`) into the unpacked sdist's
`tests/`, so that mergekit's whole suite runs. Written here from what the test files ask of it (mergekit's
repository has its own): tiny models of four architectures saved to a path, and a merge run into a
temporary directory that checks its output has a model, a config, no NaN and every tensor its
architecture requires.
"""

import os
import tempfile
from collections.abc import Callable

import transformers
from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Callable[[str], None] | None = None,
    index_json_name: str | None = None,
    auto_arch: bool = False,
):
    index_json_name = index_json_name or "model.safetensors.index.json"
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        index = os.path.join(out, index_json_name)
        assert os.path.exists(index) or os.path.exists(index.replace(".index.json", "")), "no model written"
        assert os.path.exists(os.path.join(out, "config.json")), "no config.json written"
        if check_nan:
            loader = LazyTensorLoader.from_disk(out, lazy_unpickle=False)
            for name in loader.index.tensor_paths:
                assert not loader.get_tensor(name).isnan().any(), f"NaN in {name}"
        if check_tensors:
            model_config = transformers.AutoConfig.from_pretrained(out)
            arch_info = (
                get_architecture_info(config, MergeOptions()) if auto_arch else arch_info_for_config(model_config)
            )
            written = ShardedTensorIndex.from_disk(out).tensor_paths
            for weight in arch_info.all_weights(model_config):
                if not weight.optional and weight.name not in written and not any(a in written for a in weight.aliases):
                    raise RuntimeError(f"Output missing tensor {weight.name}")
        if validate:
            validate(out)


def _save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picollama(path, vocab_size: int = 64) -> str:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2
    )
    return _save(transformers.LlamaForCausalLM(config), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    config = transformers.GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
    )
    return _save(transformers.GraniteForCausalLM(config), path)


def make_gpt2size(path) -> str:
    """GPT-2 small's shape (12 layers: the tests stack layer ranges [0, 12])."""
    config = transformers.GPT2Config(n_ctx=1024, n_embd=768, n_head=12, n_layer=12, n_positions=1024, vocab_size=50257)
    return _save(transformers.GPT2LMHeadModel(config), path)


def make_picoLlaVa(path) -> str:
    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128
    )
    text = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    return _save(transformers.LlavaForConditionalGeneration(config), path)
