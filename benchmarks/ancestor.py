# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The seed's ancestor question: can the dense model an MoE was upcycled from be recovered
from its experts? Measured on the upcycled testbed, whose ancestor is known.

Per MoE layer, estimates of the ancestor's MLP from the E experts' [gate | up | down]:

    mean            the plain average (= expert_uniform);
    median          the coordinate-wise median;
    trimmed_mean    the coordinate-wise mean without each coordinate's largest and smallest value;
    stock_inverse   model stock's geometry run backwards (Jang et al. 2024, arXiv:2403.19522):
                    model stock finds fine-tuned models at a consistent angle around their
                    pre-trained centre. With d_i = w_i - mean, the centre a = mean - v with v
                    orthogonal to the d_i makes the deltas w_i - a mutually orthogonal (cos 0)
                    for |v|^2 = mean_i |d_i|^2 / (E - 1); the direction of v is not identifiable
                    from the experts alone, so it is taken towards the origin (the component of
                    the mean orthogonal to the d_i): an assumption this measures.

The discussion's gradient back-projection needs the training gradients, which an upcycled
checkpoint does not have: not measured. For each estimate: the cosine and the relative
distance ||estimate - ancestor|| / ||ancestor|| per layer (the MoE's experts' own distance
beside), and the held-out perplexity of the MoE with every sparse block replaced by the
estimate (a dense Mistral: the MoE's attention, the estimated MLP), beside the ancestor's.

    MOE2DENSE_CACHE=/work/cache python benchmarks/ancestor.py --preset example
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergekit.options import MergeOptions  # noqa: E402

from benchmarks.quality import score  # noqa: E402
from benchmarks.testbed import PRESETS, build_testbed  # noqa: E402
from mergekit_moe2dense.build import build_dense  # noqa: E402
from mergekit_moe2dense.config import Moe2DenseConfig  # noqa: E402
from mergekit_moe2dense.perplexity import load_eval_documents  # noqa: E402

ESTIMATES = ("mean", "median", "trimmed_mean", "stock_inverse")
TRUTH = "ancestor"  # the true ancestor MLP, for the perplexity ceiling of any estimate


def estimate(experts: torch.Tensor, how: str) -> torch.Tensor:
    """The ancestor estimate [D] from flattened experts [E, D] (float64)."""
    if how == "mean":
        return experts.mean(0)
    if how == "median":
        return experts.median(0).values
    if how == "trimmed_mean":
        ordered = experts.sort(0).values
        return ordered[1:-1].mean(0)
    mean = experts.mean(0)
    deltas = experts - mean
    basis = torch.linalg.qr(deltas.T).Q  # [D, E]: the span of the deltas
    radial = mean - basis @ (basis.T @ mean)
    length = (deltas.pow(2).sum(1).mean() / (experts.shape[0] - 1)).sqrt()
    return mean - length * radial / radial.norm()


def flat_experts(moe, layer: int) -> torch.Tensor:
    experts = moe.model.layers[layer].mlp.experts
    width = experts.down_proj.shape[-1]
    gate, up = experts.gate_up_proj[:, :width], experts.gate_up_proj[:, width:]
    return torch.cat([gate.flatten(1), up.flatten(1), experts.down_proj.flatten(1)], dim=1).double()


def ancestor_mlp(ancestor, layer: int) -> torch.Tensor:
    mlp = ancestor.model.layers[layer].mlp
    parts = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    return torch.cat([p.flatten() for p in parts]).double()


def run(preset: str, max_tokens: int, cache_dir: str | None = None) -> str:
    testbed = build_testbed(preset, cache_dir=cache_dir)
    if testbed.ancestor is None:
        raise SystemExit(f"{preset} was trained from scratch: it has no ancestor")
    moe = transformers.AutoModelForCausalLM.from_pretrained(testbed.moe, dtype=torch.float32)
    ancestor = transformers.AutoModelForCausalLM.from_pretrained(testbed.ancestor, dtype=torch.float32)
    documents = load_eval_documents(testbed.test_dir)
    seq_len = min(256, moe.config.max_position_embeddings)
    lines = ["| estimate | layer | cosine to ancestor | relative distance |", "|---|---|---|---|"]
    perplexity = [
        ("MoE", score(testbed.moe, documents, seq_len, max_tokens, "MoE").perplexity),
        ("ancestor", score(testbed.ancestor, documents, seq_len, max_tokens, "ancestor").perplexity),
    ]
    with tempfile.TemporaryDirectory(prefix="moe2dense-ancestor-") as work:
        base = str(Path(work) / "uniform")
        config = {"merge_method": "expert_uniform", "models": [{"model": str(testbed.moe)}], "dtype": "float32"}
        build_dense(Moe2DenseConfig.model_validate(config), base, MergeOptions(quiet=True))
        dense = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        for layer in range(len(moe.model.layers)):
            truth = ancestor_mlp(ancestor, layer)
            experts = flat_experts(moe, layer)
            own = torch.nn.functional.cosine_similarity(experts, truth[None], dim=1).mean()
            spread = ((experts - truth).norm(dim=1) / truth.norm()).mean()
            lines.append(f"| (each expert, mean) | {layer} | {own:.4f} | {spread:.4f} |")
            for how in ESTIMATES:
                guess = estimate(experts, how)
                cosine = torch.nn.functional.cosine_similarity(guess, truth, dim=0)
                lines.append(f"| {how} | {layer} | {cosine:.4f} | {(guess - truth).norm() / truth.norm():.4f} |")
        for how in (TRUTH, *ESTIMATES):
            with torch.no_grad():
                for layer, decoder in enumerate(dense.model.layers):
                    if how == TRUTH:
                        guess = ancestor_mlp(ancestor, layer).float()
                    else:
                        guess = estimate(flat_experts(moe, layer), how).float()
                    mlp = decoder.mlp
                    sizes = [mlp.gate_proj.weight.numel(), mlp.up_proj.weight.numel(), mlp.down_proj.weight.numel()]
                    gate, up, down = guess.split(sizes)
                    mlp.gate_proj.weight.copy_(gate.view_as(mlp.gate_proj.weight))
                    mlp.up_proj.weight.copy_(up.view_as(mlp.up_proj.weight))
                    mlp.down_proj.weight.copy_(down.view_as(mlp.down_proj.weight))
            path = Path(work) / how
            dense.save_pretrained(path)
            transformers.AutoTokenizer.from_pretrained(testbed.moe).save_pretrained(path)
            perplexity.append(
                (f"MoE attention + {how} MLP", score(path, documents, seq_len, max_tokens, how).perplexity)
            )
    moe_ppl = perplexity[0][1]
    lines += ["", "| model | ppl | ratio to MoE |", "|---|---|---|"]
    lines += [f"| {label} | {value:.2f} | {value / moe_ppl:.3f} |" for label, value in perplexity]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="example", choices=sorted(PRESETS))
    parser.add_argument("--max-tokens", type=int, default=20000, help="scored tokens per test domain")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    print(run(args.preset, args.max_tokens))


if __name__ == "__main__":
    main()
