# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The dense re-fits on a random tiny GPT-OSS (biases, clamped SwiGLU): mechanics, not quality.

Per method and re-fit: the mean over layers of the relative error of the dense MLP against the
MoE block's output on the calibration tokens, before (the merge, refit: none) and after the fit
(`refit_layers`, the layer-sequential engine), and on held-out tokens the KL divergence of the
dense model's next-token distribution from the MoE's (the MoE with each sparse block replaced by
the re-fit's dense MLP, its biases and GPT-OSS's own activation).

    PYTHONPATH=. python benchmarks/refit_gpt_oss.py [--layers 4 --experts 8 --tokens 4096 --fit-steps 300]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import transformers
from mergekit.common import ModelReference

from benchmarks.refit_error import kl_divergence, mean_errors, random_batches
from mergekit_moe2dense.calibration import collect_statistics
from mergekit_moe2dense.calibration.refit import DenseMLP, refit_layers
from mergekit_moe2dense.config import CalibrationConfig
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.merge import assemble, assemble_biases
from mergekit_moe2dense.methods import get_method
from mergekit_moe2dense.plan import with_family_scales
from mergekit_moe2dense.refit import FitSettings


def held_out_kl(moe, family, plans, reader, fitted, batches) -> float:
    dense = copy.deepcopy(moe)
    for plan in plans:
        index = plan.layer.index
        t = {**assemble(plan, reader.read_slice), **assemble_biases(plan, reader.read_slice)}
        names = family.dense_mlp_names(index, t)
        t = {p: fitted.get(names[p], t[p]) for p in t}
        biases = {p: t[p] for p in ("gate_bias", "up_bias", "down_bias")}
        hidden = family.dense_hidden(moe.model.layers[index].mlp.experts, index)
        mlp = DenseMLP(t["gate"], t["up"], t["down"], None, biases, hidden)
        dense.model.layers[index].mlp = family.dense_block(mlp)
    return kl_divergence(moe, dense, batches)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--fit-steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"] * (args.layers // 2)
        + ["sliding_attention"] * (args.layers % 2),
    )
    moe = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in moe.model.layers:
            experts = layer.mlp.experts
            experts.gate_up_proj.normal_(0, 0.2)
            experts.down_proj.normal_(0, 0.2)
            experts.gate_up_proj_bias.normal_(0, 0.1)
            experts.down_proj_bias.normal_(0, 0.1)
            layer.mlp.router.weight.normal_(0, 0.5)
            layer.mlp.router.bias.normal_(0, 0.1)
    with tempfile.TemporaryDirectory() as path:
        moe.save_pretrained(path)
        source = SourceModel.open(ModelReference.parse(path))
        family = source.family
        calib = random_batches(args.tokens // (4 * 128), 128, 4, 512, seed=1)
        held = random_batches(4, 128, 4, 512, seed=2)
        calibration = CalibrationConfig(dataset="random tokens", max_token_samples=4096, engine="full")
        stats = collect_statistics(source, calib, calibration, progress=False)
        layers, reader = source.moe_layers(), source.reader
        E, k = args.experts, config.num_experts_per_tok
        print(
            f"random GPT-OSS: {args.layers} layers, {E} experts (top-{k}), hidden 64, expert width 128, biases; "
            f"{sum(int(b.attention_mask.sum()) for b in calib)} calibration tokens, "
            f"{sum(int(b.attention_mask.sum()) for b in held)} held-out tokens, fit_steps {args.fit_steps}\n"
        )
        print("| method | refit | mean rel. MLP error before -> after (calibration) | held-out KL(MoE || dense) |")
        print("|---|---|---|---|")
        rows = [("router_weighted", {}), ("router_weighted", {"refit_gate_up": "regmean"}), ("max_contribution", {})]
        for name, raw in rows:
            method = get_method(name)
            for refit in ("none", "scale", "down_proj", "fit"):
                if refit == "none" and raw:
                    continue  # RegMean alone is a re-fit too: the row below is its gate/up with refit: none
                extra = {"fit_steps": args.fit_steps} if refit == "fit" else {}
                params = method.resolve_parameters({**raw, "refit": refit, **extra}, num_experts=E, top_k=k)
                plans = with_family_scales(method.plan(stats, params, layers).layers, family, source.config, stats)
                fitted, err = {}, "n/a"
                if params.needs_refit:
                    result = refit_layers(
                        source,
                        plans,
                        calib,
                        mode=refit,
                        damping=params.refit_damping,
                        gate_up=params.refit_gate_up,
                        fit=FitSettings(steps=args.fit_steps) if refit == "fit" else None,
                        progress=False,
                    )
                    fitted, err = result.tensors, mean_errors(result.errors)
                kl = held_out_kl(moe, family, plans, reader, fitted, held)
                label = f"{name} {raw}" if raw else name
                print(f"| {label} | {refit} | {err} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
