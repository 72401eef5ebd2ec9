# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""One recommended conversion for what `inspect` found, and the warning for a merge that ignores it.

The recommendation is the measured best setting for each case, the same as the shipped configs
(tests/test_recommend.py holds them equal):

- a dense model from `aligned` experts (a shared ancestor, as after sparse upcycling):
  `router_weighted` + `refit: down_proj` (configs/aligned.yml);
- a dense model from `permuted` or `unrelated` experts: never average; `concat` of the top-k
  experts by `score: usage_diversity` + `refit: fit` with 1200 fit steps, calibrated on 512
  sequences, four times the usual: the fit gains from more text and steps
  (configs/from_scratch.yml; `score: contribution` for a family whose calibration does not
  record the experts' outputs, Llama 4);
- a smaller MoE, whatever the verdict: `prune_experts` to N experts (half by default),
  `score: reap`, `refit: down_proj` on 512 calibration sequences (configs/smaller_moe.yml; on
  plenty of text like the model's the re-fit gains, on little it costs); `score: diversity`
  where the router is balanced by a choice bias (DeepSeek-V3 routing: GLM-4.5, dots.llm1,
  ERNIE 4.5, MiniMax-M2), whose even usage leaves the usage-weighted scores little to tell
  experts apart by (configs/smaller_moe_bias_balanced.yml).

`inspect` prints it and writes it as a YAML config (`config_yaml`) that `mergekit-moe2dense
CONFIG OUT` runs; benchmarks/quickstart.py converts with it. `averaging_warning` is what a merge
says before the work when its method averages experts that `inspect` would call unaligned.
Pure: no torch, no model reading.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from typing import Literal

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = [
    "AVERAGING_METHODS",
    "CALIBRATION_PLACEHOLDER",
    "VERDICTS",
    "ExpertWarning",
    "Recommendation",
    "RecommendationError",
    "averaging_warning",
    "config_yaml",
    "recommend",
]

Output = Literal["dense", "moe"]
VERDICTS = ("aligned", "permuted", "unrelated")  # what `inspect` finds, best to worst

# Methods that average every expert of a layer into one dense MLP: only sound on aligned experts.
AVERAGING_METHODS = ("router_weighted", "top_k_tempered", "expert_uniform")
CALIBRATION_PLACEHOLDER = "path/to/calibration"
NUM_SAMPLES = 128
FIT_SAMPLES = 4 * NUM_SAMPLES  # the gradient fit and a smaller MoE's re-fit gain from four times the text
SEQ_LEN = 512


class RecommendationError(Moe2DenseError, ValueError):
    """No recommendation for these inputs: an unknown verdict or output, an impossible expert count."""


@dataclass(frozen=True)
class Recommendation:
    """The conversion to run: `merge_method` with `parameters`, as the shipped config `preset`."""

    verdict: str
    output: Output
    merge_method: str
    parameters: dict
    preset: str
    why: str
    num_samples: int = NUM_SAMPLES  # calibration sequences

    def describe(self) -> str:
        """`concat (score: usage_diversity, refit: fit)`."""
        return f"{self.merge_method} ({', '.join(f'{k}: {v}' for k, v in self.parameters.items())})"

    def config(self, model: str, calibration: dict, dtype: str = "bfloat16") -> dict:
        """The conversion config (the YAML schema of `mergekit-moe2dense CONFIG OUT`) as a dict."""
        return {
            "merge_method": self.merge_method,
            "models": [{"model": model}],
            "parameters": dict(self.parameters),
            "calibration": dict(calibration),
            "dtype": dtype,
        }


_DENSE = {
    "aligned": (
        "router_weighted",
        {"aggregate": "mean_logit", "refit": "down_proj"},
        "configs/aligned.yml",
        "the experts share an ancestor: average them by the router's mean preferences, then re-fit "
        "each layer's down projection to the MoE's output",
        NUM_SAMPLES,
    ),
    "unaligned": (
        "concat",
        {"score": "usage_diversity", "refit": "fit", "fit_steps": 1200},
        "configs/from_scratch.yml",
        "the experts are not aligned, so averaging them would destroy the model: keep the top-k experts "
        "of each layer side by side, then fit each layer to the MoE's output on plenty of text",
        FIT_SAMPLES,
    ),
}


def recommend(
    verdict: str,
    output: Output = "dense",
    *,
    num_experts: int | None = None,
    target_experts: int | None = None,
    expert_outputs: bool = True,
    balanced_by_bias: bool = False,
) -> Recommendation:
    """The recommended conversion for an MoE of `num_experts` experts whose `inspect` verdict is
    `verdict`, into a dense model or a smaller MoE of `target_experts` experts (default: half);
    `expert_outputs`: whether the family's calibration can record the experts' outputs (the
    diversity scores need them); `balanced_by_bias`: whether its router chooses with a
    load-balancing bias (`MoEFamily.balanced_by_bias`)."""
    if verdict not in VERDICTS:
        raise RecommendationError(f"unknown verdict {verdict!r}: one of {', '.join(VERDICTS)}")
    if output == "dense":
        if target_experts is not None:
            raise RecommendationError("--target-experts sets the experts of a smaller MoE: give --output moe")
        method, parameters, preset, why, num_samples = _DENSE["aligned" if verdict == "aligned" else "unaligned"]
        parameters = dict(parameters)
        if not expert_outputs and parameters.get("score") == "usage_diversity":
            parameters["score"] = "contribution"
        return Recommendation(verdict, output, method, parameters, preset, why, num_samples)
    if output != "moe":
        raise RecommendationError(f"unknown output {output!r}: dense or moe")
    if num_experts is None:
        raise RecommendationError("a smaller MoE's recommendation needs the model's number of experts")
    kept = max(1, num_experts // 2) if target_experts is None else target_experts
    if not 1 <= kept <= num_experts:
        raise RecommendationError(
            f"--target-experts {kept} is out of range: the model has {num_experts} experts per layer"
        )
    if balanced_by_bias and expert_outputs:
        score, preset = "diversity", "configs/smaller_moe_bias_balanced.yml"
        kept_for = (
            "whose outputs are most unlike each other (a router balanced by a bias uses every expert "
            "about as often, so usage tells them apart little)"
        )
    else:
        score, preset = "reap", "configs/smaller_moe.yml"
        kept_for = "with the largest REAP saliency (gate-weighted output norm where selected)"
    why = (
        f"keep the {kept} of {num_experts} experts per layer {kept_for}, with their router rows, then re-fit "
        "their down projections jointly to the MoE layer's output on plenty of text"
    )
    parameters = {"num_experts": kept, "score": score, "refit": "down_proj"}
    return Recommendation(verdict, output, "prune_experts", parameters, preset, why, FIT_SAMPLES)


def _scalar(value) -> str:
    """A YAML scalar: numbers and plain names bare, anything else (paths) as a JSON string."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.replace("_", "").isalnum()):
        return str(value)
    return json.dumps(value)


def config_yaml(recommendation: Recommendation, model: str, dataset: str | None, seq_len: int = SEQ_LEN) -> str:
    """The recommendation as a commented YAML config; `dataset` None writes a placeholder to fill in."""
    rec = recommendation
    target = "a smaller MoE" if rec.output == "moe" else "a dense model"
    header = (
        f"Written by `mergekit-moe2dense inspect`: the recommended conversion into {target} "
        f"for experts it finds {rec.verdict}, as {rec.preset}. Why: {rec.why}."
    )
    lines = [
        *textwrap.wrap(header, width=98, initial_indent="# ", subsequent_indent="# "),
        "# Run it: mergekit-moe2dense THIS_FILE OUT",
        f"merge_method: {rec.merge_method}",
        "models:",
        f"  - model: {_scalar(model)}",
        "parameters:",
        *(f"  {name}: {_scalar(value)}" for name, value in rec.parameters.items()),
        "calibration:",
    ]
    if dataset is None:
        lines += [
            "  # FILL IN before running: the calibration text (.txt / .jsonl / .parquet, a directory of them,",
            "  # or a datasets name); inspect ran without --data, so it had none to write here",
            f"  dataset: {CALIBRATION_PLACEHOLDER}",
        ]
    else:
        lines.append(f"  dataset: {_scalar(dataset)}")
    lines += [
        f"  num_samples: {rec.num_samples}",
        f"  seq_len: {seq_len}                      # tokens per sequence: at most the model's context",
        "dtype: bfloat16                     # dtype of the output",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ExpertWarning:
    """A merge averages experts that `inspect` calls unaligned (`verdict`); `instead` is the method
    the recommendation names. The merge runs anyway; its summary says the verdict was ignored."""

    method: str
    verdict: str
    instead: str

    @property
    def message(self) -> str:
        return (
            f"{self.method} averages the experts, and they are {self.verdict} (the weight similarity of "
            f"`mergekit-moe2dense inspect`): the dense model will be far worse than the MoE. "
            f"Use {self.instead} instead (configs/from_scratch.yml)"
        )


def averaging_warning(method: str, verdict: str) -> ExpertWarning | None:
    """The warning for `method` on experts of `verdict`, or None when the two agree."""
    if method not in AVERAGING_METHODS or verdict == "aligned":
        return None
    return ExpertWarning(method, verdict, recommend(verdict).describe())
