# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Plain helpers shared by the tests: tiny Mixtral checkpoints, configs, the CLI runner.

Fixtures live in conftest.py; everything a test module imports lives here (or, for the
tiny models of the other families, in tiny_families.py), never in conftest or a test module.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
import transformers
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_moe2dense.cli import main
from mergekit_moe2dense.config import Moe2DenseConfig

TEXT = (
    "def merge(experts, weights):\n    return sum(w * e for w, e in zip(weights, experts))\n\n\n"
    "The router assigns every token to two of the eight experts of each layer.\n\n\n"
    '#include <stdio.h>\nint main(void) { printf("hello\\n"); return 0; }\n\n\n'
) * 4

# one parameter set per single-model method, for the tests that run every method
METHOD_PARAMS = {
    "router_weighted": {"aggregate": "mean_logit"},
    "top_k_tempered": {"temperature": 0.5},
    "expert_uniform": {},
    "single_expert": {},
}


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


def logits_of(path, input_ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def make_config(model, method, calib_dir, **params) -> Moe2DenseConfig:
    """A float32 config for `method` on `model` with a small calibration pass over `calib_dir`."""
    return Moe2DenseConfig.model_validate(
        {
            "merge_method": method,
            "models": [{"model": str(model)}],
            "parameters": params,
            "calibration": {"dataset": str(calib_dir), "num_samples": 8, "seq_len": 32, "batch_size": 3},
            "dtype": "float32",
        }
    )


# The console scripts of the running interpreter's environment.
BIN = Path(sys.executable).parent


def write_config(path: Path, model, calib_dir, method="router_weighted", **params) -> Path:
    """The same kind of config as a YAML file, for the command lines."""
    config = {
        "merge_method": method,
        "models": [{"model": str(model)}],
        "parameters": params,
        "calibration": {"dataset": str(calib_dir), "num_samples": 6, "seq_len": 32, "batch_size": 2},
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, fragment: str):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert re.search(fragment, result.output), result.output
    assert len([line for line in result.output.strip().splitlines() if line.startswith("Error")]) == 1


def convert_uniform(moe: Path, out: Path, calib_dir) -> Path:
    """The `expert_uniform` dense conversion of a tiny MoE: a student for `heal` tests."""
    from mergekit_moe2dense.build import build_dense

    build_dense(make_config(moe, "expert_uniform", calib_dir), str(out))
    return out


class StopAfterSave(transformers.TrainerCallback):
    """Raises KeyboardInterrupt once the checkpoint of step `step` is written: a crashed run."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt


def state_of(path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}
