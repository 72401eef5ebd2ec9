# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""How much the layer-sequential re-fit reduces reconstruction error, on a random tiny Mixtral.

A random model says nothing about perplexity; it does measure the mechanics:
per layer, the relative error of the dense MLP against the MoE block's output on
calibration tokens (before / after the fit, from `refit_layers`), and on held-out
tokens the KL divergence of the dense model's next-token distribution from the MoE's.

    PYTHONPATH=. python benchmarks/refit_error.py [--layers 4 --experts 8 --tokens 4096]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers
from mergekit.common import ModelReference

from mergekit_moe2dense.calibration import collect_statistics
from mergekit_moe2dense.calibration.batches import TokenBatch
from mergekit_moe2dense.calibration.refit import DenseMLP, refit_layers
from mergekit_moe2dense.config import CalibrationConfig
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.merge import assemble
from mergekit_moe2dense.methods import get_method


def random_batches(n, seq_len, batch_size, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        TokenBatch(
            torch.randint(0, vocab, (batch_size, seq_len), generator=g),
            torch.ones(batch_size, seq_len, dtype=torch.long),
        )
        for _ in range(n)
    ]


def held_out_kl(moe, plans, reader, fitted, batches) -> float:
    dense = transformers.MixtralForCausalLM(moe.config).eval()
    dense.load_state_dict(moe.state_dict())
    for plan in plans:
        t = assemble(plan, reader.read_slice)
        names = {p: f"model.layers.{plan.layer.index}.mlp.{p}_proj.weight" for p in t}
        t = {p: fitted.get(names[p], t[p]) for p in t}
        dense.model.layers[plan.layer.index].mlp = DenseMLP(t["gate"], t["up"], t["down"], torch.nn.functional.silu)
    return kl_divergence(moe, dense, batches)


def kl_divergence(moe, dense, batches) -> float:
    """Mean over tokens of KL(MoE || dense) of the next-token distributions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            p = torch.log_softmax(moe(input_ids=batch.input_ids).logits, -1)
            q = torch.log_softmax(dense(input_ids=batch.input_ids).logits, -1)
            total += float((p.exp() * (p - q)).sum())
            count += p.shape[0] * p.shape[1]
    return total / count


def mean_errors(errors: dict[int, tuple[float, float]]) -> str:
    """ "before -> after": the layers' mean relative errors."""
    before = sum(b for b, _ in errors.values()) / len(errors)
    after = sum(a for _, a in errors.values()) / len(errors)
    return f"{before:.3f} -> {after:.3f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the table's method names")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
    )
    moe = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0, 0.2)
            layer.mlp.experts.down_proj.normal_(0, 0.2)
            layer.mlp.gate.weight.normal_(0, 0.5)
    with tempfile.TemporaryDirectory() as path:
        moe.save_pretrained(path)
        source = SourceModel.open(ModelReference.parse(path))
        calib = random_batches(args.tokens // (4 * 128), 128, 4, 512, seed=1)
        held = random_batches(4, 128, 4, 512, seed=2)
        calibration = CalibrationConfig(dataset="random tokens", max_token_samples=4096, engine="full")
        stats = collect_statistics(source, calib, calibration, progress=False)
        layers, reader = source.moe_layers(), source.reader
        E, k = args.experts, config.num_experts_per_tok
        rows = [
            ("max_contribution", {}),
            ("concat", {"num_experts": k}),
            ("concat", {"num_experts": E}),
            ("router_weighted", {}),
            ("router_weighted", {"refit_gate_up": "regmean"}),
            ("expert_uniform", {}),
            ("expert_uniform", {"refit_gate_up": "regmean"}),
        ]
        print(
            f"random Mixtral: {args.layers} layers, {E} experts (top-{k}), hidden 64, expert width 128; "
            f"{sum(int(b.attention_mask.sum()) for b in calib)} calibration tokens, "
            f"{sum(int(b.attention_mask.sum()) for b in held)} held-out tokens\n"
        )
        print("| method | refit | mean rel. MLP error before -> after (calibration) | held-out KL(MoE || dense) |")
        print("|---|---|---|---|")
        for name, raw in rows:
            if args.methods and name not in args.methods.split(","):
                continue
            method = get_method(name)
            for refit in ("none", "scale", "down_proj"):
                params = method.resolve_parameters({**raw, "refit": refit}, num_experts=E, top_k=k)
                plans = method.plan(stats, params, layers).layers
                fitted, err = {}, "n/a"
                if params.needs_refit:
                    result = refit_layers(
                        source,
                        plans,
                        calib,
                        mode=refit,
                        damping=params.refit_damping,
                        gate_up=params.refit_gate_up,
                        progress=False,
                    )
                    fitted, err = result.tensors, mean_errors(result.errors)
                kl = held_out_kl(moe, plans, reader, fitted, held)
                label = f"{name} {raw}" if raw else name
                print(f"| {label} | {refit} | {err} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
