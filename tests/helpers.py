# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Plain helpers shared by the tests: tiny Mixtral checkpoints, configs, the CLI runner.

Fixtures live in conftest.py; everything a test module imports lives here (or, for the
tiny models of the other families, in tiny_families.py), never in conftest or a test module.
"""

from __future__ import annotations

import os
import re
import subprocess
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


def multimodal_text_logits(path, model_type: str, input_ids: torch.Tensor) -> torch.Tensor:
    """A multimodal checkpoint's text-only logits, from its own class (not the text-only one)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # Llama 4's full forward needs pixel values: its language model alone
        return (model.language_model if model_type == "llama4" else model)(input_ids=input_ids).logits


# Methods that re-fit the down projection by default: the tests of their own arithmetic
# (exactness against the MoE, experts copied bit for bit) ask for the re-fit where they want it.
REFIT_BY_DEFAULT = ("router_weighted", "concat")


def make_config(model, method, calib_dir, **params) -> Moe2DenseConfig:
    """A float32 config for `method` on `model` with a small calibration pass over `calib_dir`
    (without the re-fit unless `refit` is given)."""
    if method in REFIT_BY_DEFAULT:
        params = {"refit": "none", **params}
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


def dead_pid() -> int:
    """The PID of a process that has exited: what a run killed with SIGKILL leaves in its names."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def assert_one_line_error(result, fragment: str):
    # CliRunner catches every exception and never prints its traceback: an error that escaped
    # as a traceback shows as result.exception being something other than click's exit
    assert isinstance(result.exception, SystemExit), f"{result.exception!r}\n{result.output}"
    assert result.exit_code in (1, 2), result.output  # click: 1 an error, 2 a usage error
    assert re.search(fragment, result.output), result.output
    assert len([line for line in result.output.strip().splitlines() if line.startswith("Error")]) == 1


# -- quantized checkpoints (what FP8 and MXFP4 releases ship), made from a float checkpoint ------------------
FP8_MAX = 448.0  # float8_e4m3fn


def _block_scales(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per block of the last two dims (the last block of a dim may be partial): amax / FP8_MAX."""
    rows, cols = weight.shape[-2:]
    padded = torch.nn.functional.pad(weight.abs(), (0, -cols % block[1], 0, -rows % block[0]))
    grid = padded.unflatten(-1, (-1, block[1])).unflatten(-3, (-1, block[0]))  # [..., R, b0, C, b1]
    amax = grid.amax(dim=(-3, -1))
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()


def expand_blocks(scales: torch.Tensor, shape, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape[-2:]
    return scales.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)[..., :rows, :cols]


def fp8_quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 (DeepSeek-V3's format): the e4m3 weight and its `weight_scale_inv`."""
    scales = _block_scales(weight.float(), block)
    quantized = (weight.float() / expand_blocks(scales, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX)
    return quantized.to(torch.float8_e4m3fn), scales


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXFP4 (OCP microscaling, GPT-OSS's experts) of `weight` [E, out, in]: blocks [E, out, in/32, 16]
    (two E2M1 values a byte, the even one in the low nibble), scales [E, out, in/32] (exponent + 127),
    and the exact dequantized value [E, out, in]."""
    groups = weight.float().unflatten(-1, (-1, 32))  # [E, out, G, 32]
    amax = groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-126)
    exponent = torch.floor(torch.log2(amax)) - 2  # the largest FP4 magnitude is 6 = 1.5 * 2**2
    scaled = groups / torch.exp2(exponent)
    codes = (scaled[..., None] - FP4_VALUES).abs().argmin(-1)  # nearest E2M1 value (clips at +-6)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    dequantized = (FP4_VALUES[codes] * torch.exp2(exponent)).flatten(-2)
    return packed, (exponent[..., 0] + 127).to(torch.uint8), dequantized


def quantize_fp8_checkpoint(source: Path, path: Path, block=(16, 16), quantize=None) -> tuple[Path, dict]:
    """A copy of a float safetensors checkpoint with its linear weights in block-wise FP8 (every
    `*_proj.weight` and fused expert tensor; router, norms and embeddings stay as they are, as in
    DeepSeek-V3's release), and `quantization_config` {fp8, weight_block_size}. Returns the path
    and the exactly dequantized tensors (name -> float32), the reference."""
    from safetensors.torch import load_file

    quantize = quantize or (lambda name: name.endswith("_proj.weight") or name.endswith(("gate_up_proj", "down_proj")))
    path.mkdir(parents=True, exist_ok=True)
    state = load_file(os.fspath(source / "model.safetensors"))
    out, reference = {}, {}
    for name, value in state.items():
        if quantize(name) and value.dim() >= 2:
            data, scales = fp8_quantize(value, block)
            out[name], out[name + "_scale_inv"] = data, scales
            reference[name] = data.float() * expand_blocks(scales, value.shape, block)
        else:
            out[name] = value
    save_file(out, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
    _copy_with_quantization(source, path, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                           "weight_block_size": list(block)})  # fmt: skip
    return path, reference


def _copy_with_quantization(source: Path, path: Path, quantization: dict) -> None:
    import json
    import shutil

    for item in source.iterdir():
        if item.name not in ("model.safetensors", "config.json", "model.safetensors.index.json"):
            shutil.copy(item, path / item.name)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config, indent=2))


def save_dequantized(source: Path, path: Path, reference: dict) -> Path:
    """The checkpoint at `source` (float) with the `reference` tensors in place: the dequantized MoE."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(source, path)
    state = load_file(os.fspath(source / "model.safetensors"))
    state.update({name: value.to(state[name].dtype) for name, value in reference.items()})
    save_file(state, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def quantize_mxfp4_checkpoint(source: Path, path: Path) -> tuple[Path, dict]:
    """A copy of a float GPT-OSS checkpoint with its expert matrices in MXFP4, as the release ships
    them: `mlp.experts.{gate_up,down}_proj` [E, in, out] become `*_blocks` [E, out, in/32, 16] and
    `*_scales` [E, out, in/32]; `quantization_config` {mxfp4}. Returns the path and the exactly
    dequantized tensors (name -> [E, in, out] float32), the reference."""
    from safetensors.torch import load_file

    path.mkdir(parents=True, exist_ok=True)
    state = load_file(os.fspath(source / "model.safetensors"))
    out, reference = {}, {}
    for name, value in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales, exact = mxfp4_quantize(value.transpose(1, 2))
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
            reference[name] = exact.transpose(1, 2).contiguous()
        else:
            out[name] = value
    save_file(out, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
    not_converted = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    _copy_with_quantization(source, path, {"quant_method": "mxfp4", "modules_to_not_convert": not_converted})
    return path, reference


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


def recorded_and_plain_logits(path, calib_dir, dtype, contributions_in_forward, own_forward=None):
    """(logits with the recorder on, logits without, its statistics) of the MoE at `path`."""
    from mergekit.common import ModelReference

    from mergekit_moe2dense.calibration import load_calibration_batches, load_moe
    from mergekit_moe2dense.calibration.runner import RouterRecorder, _empty_statistics
    from mergekit_moe2dense.config import CalibrationConfig
    from mergekit_moe2dense.io.source import SourceModel

    calibration = CalibrationConfig(
        dataset=str(calib_dir), max_token_samples=0, engine="full", num_samples=6, seq_len=24, batch_size=3
    )
    _, batches = load_calibration_batches(str(path), calibration)
    model = load_moe(str(path), device="cpu", dtype=dtype)
    family = SourceModel.open(ModelReference.parse(str(path))).family
    if contributions_in_forward is not None:  # else the family's own
        family = type(family)(**{**family.__dict__, "contributions_in_forward": contributions_in_forward})
    layers = family.moe_layer_indices(model.config)
    if own_forward is not None:  # an instance forward, as accelerate's hooks set under a device_map
        for layer in layers:
            experts = model.get_submodule(family.experts_module(layer))
            experts.forward = own_forward(experts.forward)
    with torch.no_grad():
        plain = [model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batches]
        stats, sample_ids, _ = _empty_statistics(model.config, family, batches, 0, 0)
        recorded = []
        with RouterRecorder(model, family, stats, sample_ids) as recorder:
            for batch in batches:
                recorder.begin_batch(batch)
                recorded.append(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
    forwards = [vars(model.get_submodule(family.experts_module(layer))).get("forward") for layer in layers]
    return recorded, plain, stats, forwards
