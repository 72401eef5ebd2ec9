# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Can this MoE's experts be averaged? Weight similarity, unit matching, router usage.

Averaging experts (`router_weighted`, `top_k_tempered`) only works when the experts
share an ancestor *and* their hidden units are still in the same order, as after
sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): the average of two
copies of one MLP with small differences is close to either. Experts trained from
scratch are related at best up to a permutation of their hidden units (Git
Re-Basin, Ainsworth et al. 2022, arXiv:2209.04836), and averaging them unaligned
mixes unrelated units and destroys the layer.

Per layer this measures, from the weights alone (no forward pass):

- the mean pairwise cosine of the experts' flattened gate, up and down weights;
- hidden-unit similarity: unit i of an expert is the vector
  [gate[i, :], up[i, :], down[:, i]]; for two experts A and B, `identity` is the mean
  cosine of unit i of A with unit i of B, `matched` the mean cosine after the best
  one-to-one matching of units (Hungarian algorithm, `linear_sum_assignment`), and
  `chance` the matched similarity of A's units to random Gaussian units of the same
  shape: what matching finds between unrelated experts of this size. Averaged over a
  ring of expert pairs (`expert_pairs`), with a random subsample of A's units (`max_units`)
  matched into all of B's, since each matching costs a [k, I] product over 3H;

and, from router statistics, each expert's share of selections and the normalised
entropy H(mean routing probabilities) / log E.

Verdict per layer (thresholds calibrated on upcycled vs independent tiny Mixtrals
in tests/test_inspection.py and on synthetic experts in docs/results/inspect.md):

- `unrelated`: matched - chance < MIN_EXCESS: even the best permutation finds no
  more shared structure than between random experts;
- `aligned`: otherwise, if identity >= ALIGNED_RATIO * matched: most of the shared
  structure is already in place without permuting (a shared ancestor);
- `permuted`: otherwise: related, but only after permuting units.

The model's verdict is its worst layer's. Averaging methods are suggested only when
it is `aligned`; otherwise selection/concatenation methods, with a warning. The report ends
with one recommended conversion for the output asked for (recommend.py), which `inspect` can
write as a config that `merge` runs; `quick_verdict` is the same measure on sampled units of two experts, the
check a merge makes before it averages experts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

import torch
import tqdm
from mergekit.common import ModelReference
from pydantic import ValidationError, model_validator
from scipy.optimize import linear_sum_assignment

from mergekit_moe2dense.alignment import unit_vectors
from mergekit_moe2dense.calibration import RouterStatistics, collect_statistics, load_calibration_batches
from mergekit_moe2dense.config import CalibrationConfig, check_seq_len
from mergekit_moe2dense.devices import check_device
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.families import PROJECTIONS
from mergekit_moe2dense.io.source import SourceModel
from mergekit_moe2dense.methods import METHODS
from mergekit_moe2dense.recommend import (
    SEQ_LEN,
    VERDICTS,
    Recommendation,
    config_yaml,
    recommend,
)
from mergekit_moe2dense.report_files import atomic_report, check_reports, write_report_text
from mergekit_moe2dense.settings import PathName, Settings
from mergekit_moe2dense.statistics import resolve_stats_path

LOG = logging.getLogger(__name__)
DEFAULT_SEQ_LEN = 256  # inspect's short calibration: tokens per sequence

__all__ = [
    "ALIGNED_RATIO",
    "MIN_EXCESS",
    "InspectSettings",
    "InspectionError",
    "InspectionReport",
    "LayerInspection",
    "chance_matched_similarity",
    "cosine_matrix",
    "expert_pairs",
    "gram_cosine",
    "heatmap_format",
    "inspect_layer",
    "inspect_moe",
    "layer_verdict",
    "matched_unit_similarity",
    "normalized_entropy",
    "heatmap_figure",
    "heatmap_scale",
    "plot_heatmap",
    "quick_verdict",
    "write_config",
    "unit_vectors",
]

MIN_EXCESS = 0.1
ALIGNED_RATIO = 0.5
CHANCE_SEED_OFFSET = 982_451_653
AVERAGING_METHODS = ("router_weighted", "top_k_tempered")
SELECTION_METHODS = ("single_expert", "max_contribution", "concat", "prune_experts", "merge_experts")


class InspectionError(Moe2DenseError, ValueError):
    """Bad inspection input: conflicting options, mismatched statistics."""


# -- pure math ---------------------------------------------------------------------


def gram_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine matrix from a Gram matrix G = X X^T: G_ij / sqrt(G_ii G_jj)."""
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / norms[:, None] / norms[None, :]


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[N, N] pairwise cosine of the rows of [N, ...] (each row flattened), in float64."""
    flat = vectors.reshape(vectors.shape[0], -1).double()
    return gram_cosine(flat @ flat.T)


def matched_unit_similarity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(identity, matched) mean cosine of A's units [k, D] to B's units [I >= k, D], unit-normalised.

    `identity` pairs row i of A with row i of B (A may be a subsample of k units, put
    first in both); `matched` uses the one-to-one assignment of A's rows to B's rows
    that maximises the total cosine (Hungarian algorithm).
    """
    cost = (a @ b.T).double().cpu()
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    identity = cost.diagonal().mean().item()
    return identity, cost[rows, cols].mean().item()


def chance_matched_similarity(a: torch.Tensor, num_units: int, seed: int = 0) -> float:
    """Matched similarity of A's units to `num_units` random Gaussian units: the null level."""
    # Offset: weights drawn from the same small seed (as in tests) would correlate with the noise.
    generator = torch.Generator().manual_seed(CHANCE_SEED_OFFSET + seed)
    noise = torch.randn(num_units, a.shape[1], generator=generator, dtype=a.dtype).to(a.device)
    noise = noise / noise.norm(dim=1, keepdim=True)
    return matched_unit_similarity(a, noise)[1]


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) / log E per row of [L, E] probabilities: 1 = uniform routing, 0 = one expert."""
    p = probs.double() / probs.double().sum(-1, keepdim=True)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return entropy / math.log(probs.shape[-1])


def layer_verdict(identity: float, matched: float, chance: float) -> str:
    """`aligned`, `permuted` or `unrelated` (see the module docstring for the rule)."""
    if matched - chance < MIN_EXCESS:
        return "unrelated"
    return "aligned" if identity >= ALIGNED_RATIO * matched else "permuted"


# -- the report --------------------------------------------------------------------


@dataclass
class LayerInspection:
    layer: int
    weight_cosine: dict[str, float]  # mean off-diagonal cosine per projection and "all"
    expert_cosine: list[list[float]]  # [E, E], all three projections together
    unit_identity: float
    unit_matched: float
    unit_chance: float
    verdict: str
    units_compared: int  # units of each expert matched (a subsample when wider than max_units)
    selection_share: list[float] | None = None  # per expert, sums to 1
    routing_entropy: float | None = None


@dataclass
class InspectionReport:
    """What `inspect_moe` found: per layer and, as its worst layer's, for the model; the methods
    the verdict permits, and the one conversion recommended for the output asked for, with the
    config written for it if any (`format_table` is what `inspect` prints)."""

    model: str
    num_experts: int
    top_k: int
    layers: list[LayerInspection]
    verdict: str
    suggested_methods: list[str]
    message: str
    router_tokens: int | None = None
    recommendation: Recommendation | None = None
    config_path: str | None = None  # where the recommendation was written as a YAML config
    config_needs_data: bool = False  # its calibration.dataset is a placeholder (no --data given)
    thresholds: dict[str, float] = field(
        default_factory=lambda: {"min_excess": MIN_EXCESS, "aligned_ratio": ALIGNED_RATIO}
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: str) -> None:
        write_report_text(path, json.dumps(self.to_dict(), indent=1))

    def format_table(self) -> str:
        routed = self.router_tokens is not None
        header = ["layer", "cos gate", "cos up", "cos down", "unit id", "matched", "chance", "verdict"]
        if routed:
            header += ["entropy", "min share", "max share"]
        rows = [header]
        for layer in self.layers:
            cos = layer.weight_cosine
            row = [str(layer.layer)] + [f"{cos[p]:.3f}" for p in PROJECTIONS]
            row += [
                f"{layer.unit_identity:.3f}",
                f"{layer.unit_matched:.3f}",
                f"{layer.unit_chance:.3f}",
                layer.verdict,
            ]
            if routed:
                share = layer.selection_share
                row += [f"{layer.routing_entropy:.3f}", f"{min(share):.3f}", f"{max(share):.3f}"]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += ["", f"verdict: {self.verdict}", self.message, *self._recommendation_lines()]
        return "\n".join(lines)

    def _recommendation_lines(self) -> list[str]:
        """The last lines: the one conversion to run and how to run it."""
        rec = self.recommendation
        if rec is None:
            return [f"suggested methods: {', '.join(self.suggested_methods)}"]
        target = "a smaller MoE" if rec.output == "moe" else "a dense model"
        lines = [f"recommended for {target}: {rec.describe()}, as {rec.preset}"]
        if self.config_path is None:
            return lines + ["write it as a config to run with --write-config PATH"]
        lines.append(f"wrote {self.config_path}; run it: mergekit-moe2dense {self.config_path} OUT")
        if self.config_needs_data:
            lines.append("fill in its calibration.dataset first (inspect ran without --data)")
        return lines


def _suggest(verdict: str) -> tuple[list[str], str]:
    if verdict == "aligned":
        names, message = (
            AVERAGING_METHODS + SELECTION_METHODS,
            (
                "experts share an ancestor with aligned hidden units (as in sparse upcycling): "
                "averaging-based methods can work"
            ),
        )
    else:
        names, message = (
            SELECTION_METHODS,
            (
                "WARNING: experts are not aligned"
                + (
                    " (related only up to a permutation of their hidden units)"
                    if verdict == "permuted"
                    else " (no shared ancestor)"
                )
                + "; averaging them (router_weighted, top_k_tempered) would destroy the model: "
                "select or concatenate experts instead, or keep a smaller MoE (prune_experts, merge_experts). "
                "align: weights|activations helps to merge groups of experts that are alike, "
                "it is no rescue for averaging all of them (docs/prune.md)"
            ),
        )
    return [name for name in names if name in METHODS], message


def heatmap_format(path: str) -> str:
    """The image format that `path`'s extension names, if matplotlib writes it on its own
    (not pgf, which needs a LaTeX installation); refused otherwise, naming those that work."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = sorted(set(FigureCanvasAgg.get_supported_filetypes()) - {"pgf"})
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension not in formats:
        raise InspectionError(
            f"--heatmap {path}: {f'.{extension}' if extension else 'no extension'} is not an image format "
            f"matplotlib writes; end the path with one of {', '.join('.' + name for name in formats)}"
        )
    return extension


def heatmap_scale(report: InspectionReport) -> tuple[float, float]:
    """(low, high) of the colour scale: the range of the off-diagonal cosines over every layer, so
    that an upcycled model's 0.96-0.98 spreads over the colours (a flat model gets a small margin)."""
    values = [
        row[j]
        for layer in report.layers
        for i, row in enumerate(layer.expert_cosine)
        for j in range(len(row))
        if i != j
    ]
    low, high = min(values), max(values)
    margin = max(1e-3, 0.02 * (high - low))
    return max(-1.0, low - margin), min(1.0, high + margin)


def heatmap_figure(report: InspectionReport):
    """One panel per MoE layer: the E x E cosine of the experts' weights, on one colour scale fitted
    to the data (shown on the colour bar), the experts numbered on both axes, the diagonal (each
    expert with itself, always 1) left blank; the title wrapped to the figure's width."""
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    count, num_experts = len(report.layers), report.num_experts
    cols = min(count, 8)
    rows = math.ceil(count / cols)
    figure = Figure(figsize=(2.4 * cols + 1.4, 2.4 * rows + 1.0), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    low, high = heatmap_scale(report)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    ticks = list(range(0, num_experts, max(1, math.ceil(num_experts / 8))))
    for ax, layer in zip(axes.flat, report.layers):
        cosine = torch.tensor(layer.expert_cosine)
        cosine.fill_diagonal_(float("nan"))
        image = ax.imshow(cosine.numpy(), vmin=low, vmax=high, cmap=cmap)
        ax.set_title(f"layer {layer.layer} ({layer.verdict})", fontsize=8)
        ax.set_xticks(ticks, labels=[str(t) for t in ticks], fontsize=6)
        ax.set_yticks(ticks, labels=[str(t) for t in ticks], fontsize=6)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("expert", fontsize=7)
    colorbar = figure.colorbar(image, ax=axes, shrink=0.8)
    colorbar.set_label(f"expert weight cosine ({low:.3f} to {high:.3f})", fontsize=8)
    characters = int(figure.get_figwidth() * 72 / 6)  # about 6 points per character at 10 points
    title = f"{report.model}: {report.verdict}"
    figure.suptitle(textwrap.fill(title, width=characters, break_long_words=True), fontsize=10)
    return figure


def plot_heatmap(report: InspectionReport, path: str) -> None:
    """`heatmap_figure`, written atomically in the format of `path`'s extension."""
    image_format = heatmap_format(path)
    figure = heatmap_figure(report)
    with atomic_report(path) as temporary:
        figure.savefig(temporary, format=image_format, dpi=100)


# -- reading a model -----------------------------------------------------------------


def _layer_tensors(reader, layer) -> dict[str, torch.Tensor]:
    """{proj: [E, ...]} for one layer, each expert's slice read on its own (`TensorReader`)."""
    return {p: torch.stack([reader.read_slice(expert[p]).float() for expert in layer.experts]) for p in PROJECTIONS}


def expert_pairs(num_experts: int) -> list[tuple[int, int]]:
    """The ring (e, e+1 mod E): E matchings per layer instead of E(E-1)/2, each expert in two."""
    if num_experts == 2:
        return [(0, 1)]
    return [(e, (e + 1) % num_experts) for e in range(num_experts)]


def inspect_layer(
    tensors: dict[str, torch.Tensor], index: int, max_units: int, seed: int, device: str = "cpu"
) -> LayerInspection:
    """Weight cosine, unit similarity and verdict of one layer's experts {proj: [E, ...]}."""
    num_experts = tensors["gate"].shape[0]
    flat = {p: tensors[p].reshape(num_experts, -1).float() for p in PROJECTIONS}
    grams = {p: (flat[p] @ flat[p].T).double() for p in PROJECTIONS}
    grams["all"] = sum(grams[p] for p in PROJECTIONS)
    off = ~torch.eye(num_experts, dtype=torch.bool)
    cosines = {name: gram_cosine(gram) for name, gram in grams.items()}
    width = tensors["gate"].shape[1]
    # Matching costs a [k, I] cost matrix per pair: a fixed random subsample of k units of A
    # is matched into all I units of B. Units are reordered with the sampled ones first, so
    # "identity" pairs unit i of A with unit i of B.
    pick = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[: min(max_units, width)].sort().values
    rest = torch.ones(width, dtype=torch.bool)
    rest[pick] = False
    order = torch.cat([pick, rest.nonzero().flatten()])
    units = [
        unit_vectors(tensors["gate"][e][order], tensors["up"][e][order], tensors["down"][e][:, order]).to(device)
        for e in range(num_experts)
    ]
    k = len(pick)
    scores = [matched_unit_similarity(units[a][:k], units[b]) for a, b in expert_pairs(num_experts)]
    mean_identity = sum(s[0] for s in scores) / len(scores)
    mean_matched = sum(s[1] for s in scores) / len(scores)
    chance = chance_matched_similarity(units[0][:k], width, seed=seed)
    return LayerInspection(
        layer=index,
        weight_cosine={name: cos[off].mean().item() for name, cos in cosines.items()},
        expert_cosine=cosines["all"].tolist(),
        unit_identity=mean_identity,
        unit_matched=mean_matched,
        unit_chance=chance,
        verdict=layer_verdict(mean_identity, mean_matched, chance),
        units_compared=k,
    )


class InspectSettings(Settings):
    """How `inspect_moe` inspects an MoE (the flags of `inspect`).

    - `stats_path` or `data`: router usage from the statistics file of an earlier run, or from
      a short calibration on this text: `num_samples` sequences of `seq_len` tokens,
      `batch_size` at a time, on `engine` in `dtype` (as `calibration.engine` and
      `calibration.dtype` of a build); neither: the weights alone.
    - `max_units`: hidden units per expert matched (a random subsample, drawn with `seed`, when
      wider); `device`: where the unit-matching products and the calibration run.
    - `heatmap_path`: per-layer expert cosine heatmaps (its extension sets the image format);
      `json_path`: the report as JSON.
    - `output`: what the recommended conversion makes, a dense model or a smaller MoE of
      `target_experts` experts per layer (default: half); `config_path`: write it there as a
      YAML config, calibrated on `data` (a placeholder to fill in without `data`).
    """

    error: ClassVar = InspectionError

    stats_path: PathName | None = None
    data: PathName | None = None
    max_units: int = 512
    num_samples: int = 32
    seq_len: int | None = None  # None: DEFAULT_SEQ_LEN, capped at the model's context
    batch_size: int = 4
    device: str = "cpu"
    engine: Literal["auto", "full", "layerwise"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    heatmap_path: PathName | None = None
    json_path: PathName | None = None
    seed: int = 0
    output: Literal["dense", "moe"] = "dense"
    target_experts: int | None = None
    config_path: PathName | None = None

    @model_validator(mode="after")
    def _check(self) -> InspectSettings:
        if self.stats_path and self.data:
            raise ValueError("give --stats or --data, not both")
        if self.max_units < 1:
            raise ValueError(f"max_units must be at least 1 (got {self.max_units})")
        if not self.data and (self.engine != "auto" or self.dtype is not None):
            raise ValueError("--engine and --dtype set the calibration of --data; give --data")
        if self.target_experts is not None and self.output != "moe":
            raise ValueError("--target-experts sets the experts of a smaller MoE: give --output moe")
        if self.target_experts is not None and self.target_experts < 1:
            raise ValueError(f"--target-experts must be at least 1 (got {self.target_experts})")
        self.calibration()  # a calibration block that validates
        return self

    def calibration(self, context: int | None = None) -> CalibrationConfig | None:
        """The calibration block of the short calibration on `data` (None without `data`); with
        no `seq_len` given, DEFAULT_SEQ_LEN capped at the model's `context` (its positions)."""
        if not self.data:
            return None
        seq_len = self.seq_len if self.seq_len is not None else min(DEFAULT_SEQ_LEN, context or DEFAULT_SEQ_LEN)
        values = dict(num_samples=self.num_samples, seq_len=seq_len, batch_size=self.batch_size)
        try:  # only the sums are reported: no per-token samples
            return CalibrationConfig(
                dataset=self.data, **values, max_token_samples=0, engine=self.engine, dtype=self.dtype
            )
        except ValidationError as error:
            first = error.errors()[0]
            raise InspectionError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def inspect_moe(
    model_path: str, settings: InspectSettings | None = None, *, progress: bool = False
) -> InspectionReport:
    """Inspect the MoE at `model_path` as `settings` asks (default: from its weights alone).

    Outputs are checked before any tensor is read and written only at the end; expert tensors
    are read lazily, one layer at a time.
    """
    settings = settings or InspectSettings()
    check_reports(
        {"--heatmap": settings.heatmap_path, "--json": settings.json_path, "--write-config": settings.config_path},
        [("model", model_path), ("--stats file", settings.stats_path), ("--data", settings.data)],
    )
    if settings.heatmap_path:
        heatmap_format(settings.heatmap_path)
    check_device(settings.device)
    source = SourceModel.open(ModelReference.parse(model_path))
    calibration = _calibration(settings, source.config)
    layers = source.moe_layers()
    _check_target_experts(settings, layers[0].num_experts)
    stats = _router_statistics(source, layers, settings, calibration)
    results = []
    for layer in tqdm.tqdm(layers, desc="Inspecting", unit="layer", disable=not progress):
        tensors = _layer_tensors(source.reader, layer)
        results.append(inspect_layer(tensors, layer.index, settings.max_units, settings.seed, settings.device))
    if stats is not None:
        share = stats.selection_frequency / stats.top_k
        entropy = normalized_entropy(stats.mean_probs)
        for position, result in enumerate(results):
            result.selection_share = share[position].tolist()
            result.routing_entropy = entropy[position].item()
    report = _report(model_path, source, layers, results, stats)
    report.recommendation = recommend(
        report.verdict,
        settings.output,
        num_experts=report.num_experts,
        target_experts=settings.target_experts,
        expert_outputs=source.family.contributions_in_forward,
        balanced_by_bias=source.family.balanced_by_bias,
    )
    if settings.config_path:
        write_config(report, source, settings)
    if settings.heatmap_path:
        plot_heatmap(report, settings.heatmap_path)
    if settings.json_path:
        report.write_json(settings.json_path)
    return report


def _check_target_experts(settings: InspectSettings, num_experts: int) -> None:
    """--target-experts fits the model, checked before any tensor is read."""
    if settings.target_experts is not None and settings.target_experts > num_experts:
        raise InspectionError(
            f"--target-experts {settings.target_experts} is more than the model's {num_experts} experts per layer"
        )


def _local_path(path: str) -> str:
    """An existing local path made absolute (the config may run from elsewhere); anything else as given."""
    return os.path.abspath(path) if os.path.exists(path) else path


def write_config(report: InspectionReport, source, settings: InspectSettings) -> None:
    """The report's recommendation as a YAML config at `settings.config_path`, calibrated on
    `settings.data` (a placeholder to fill in without it), with sequences the model has room for."""
    limit = getattr(source.config, "max_position_embeddings", None)
    seq_len = min(SEQ_LEN, limit) if isinstance(limit, int) else SEQ_LEN
    dataset = _local_path(settings.data) if settings.data else None
    text = config_yaml(report.recommendation, _local_path(report.model), dataset, seq_len)
    write_report_text(settings.config_path, text)
    report.config_path = settings.config_path
    report.config_needs_data = dataset is None


def quick_verdict(source, layer, *, max_units: int = 128, seed: int = 0) -> str:
    """`inspect`'s verdict on one layer from its first two experts, cheap enough to run before a
    merge: each projection is read alone and only `max_units` sampled units of it are kept (the
    same units of both experts), so the check holds a few hundred units whatever the model's size.
    Matching among sampled units only finds the pairs the sample holds: an aligned pair (unit i
    with unit i) is always found; a permuted one can read as `unrelated`, which averaging
    destroys just the same."""
    first, second = layer.experts[0], layer.experts[1]
    width = source.reader.shape(first["gate"])[0]
    pick = torch.randperm(width, generator=torch.Generator().manual_seed(seed))[: min(max_units, width)]
    a, b = (_sampled_units(source.reader, expert, pick) for expert in (first, second))
    identity, matched = matched_unit_similarity(a, b)
    return layer_verdict(identity, matched, chance_matched_similarity(a, len(pick), seed=seed))


def _sampled_units(reader, expert, pick: torch.Tensor) -> torch.Tensor:
    """The unit vectors (`alignment.unit_vectors`) of an expert's units `pick`, reading one
    projection at a time and keeping only those rows (gate, up) and columns (down)."""
    gate = reader.read_slice(expert["gate"])[pick].float()
    up = reader.read_slice(expert["up"])[pick].float()
    down = reader.read_slice(expert["down"])[:, pick].float()
    return unit_vectors(gate, up, down)


def _calibration(settings: InspectSettings, model_config) -> CalibrationConfig | None:
    """The short calibration's block: a `seq_len` given above the model's positions is refused
    (as everywhere), the default one is capped at them, with a note."""
    context = getattr(model_config, "max_position_embeddings", None)
    context = context if isinstance(context, int) else None
    calibration = settings.calibration(context)
    if settings.seq_len is None and calibration is not None and calibration.seq_len < DEFAULT_SEQ_LEN:
        LOG.warning("--seq-len %d: the model's context (max_position_embeddings)", calibration.seq_len)
    check_seq_len(calibration, model_config, option="--seq-len")
    return calibration


def _router_statistics(source, layers, settings: InspectSettings, calibration) -> RouterStatistics | None:
    """Router usage: the statistics file's (refused unless of this model; an earlier run's OUT
    names its file), a calibration's, or none."""
    if settings.stats_path:
        path = resolve_stats_path(settings.stats_path)
        stats = RouterStatistics.load(path)
        stats.check_model(source.fingerprint(layers), path)
        return stats
    if calibration is not None:
        return _calibrate(source, calibration, settings.device)
    return None


def _calibrate(source, calibration, device: str):
    """A short calibration through the build's entry point: same engine choice and dtype rule."""
    _, batches = load_calibration_batches(source.path, calibration)
    return collect_statistics(source, batches, calibration, device=device, progress=False)


def _report(model_path: str, source, layers, results: list[LayerInspection], stats) -> InspectionReport:
    """The report: the layers' results, the model's verdict (its worst layer's) and what it suggests."""
    verdict = max((r.verdict for r in results), key=VERDICTS.index)
    suggested, message = _suggest(verdict)
    return InspectionReport(
        model=model_path,
        num_experts=layers[0].num_experts,
        top_k=source.family.top_k(source.config),
        layers=results,
        verdict=verdict,
        suggested_methods=suggested,
        message=message,
        router_tokens=None if stats is None else stats.tokens,
    )
