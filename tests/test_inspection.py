# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`inspect`: similarity math on small tensors, the verdict on upcycled vs independent
tiny Mixtrals, both layouts, router usage, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from mergekit.common import ModelReference

from helpers import assert_one_line_error, make_mixtral
from mergekit_moe2dense.calibration import collect_statistics, load_calibration_batches
from mergekit_moe2dense.cli import main
from mergekit_moe2dense.config import CalibrationConfig
from mergekit_moe2dense.inspection import (
    InspectSettings,
    chance_matched_similarity,
    cosine_matrix,
    expert_pairs,
    heatmap_figure,
    inspect_moe,
    layer_verdict,
    matched_unit_similarity,
    normalized_entropy,
    unit_vectors,
)
from mergekit_moe2dense.io.source import SourceModel


def random_expert(seed: int, hidden: int = 32, width: int = 48):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(width, hidden, generator=g),
        torch.randn(width, hidden, generator=g),
        torch.randn(hidden, width, generator=g),
    )


# -- math ----------------------------------------------------------------------------


def test_cosine_of_identical_experts_is_one_and_of_independent_ones_near_zero():
    generator = torch.Generator().manual_seed(0)  # not the global RNG: the result must not depend on test order
    expert = torch.randn(48, 32, generator=generator)
    same = cosine_matrix(torch.stack([expert, expert, 3 * expert]))
    assert torch.allclose(same, torch.ones(3, 3, dtype=torch.float64))
    independent = cosine_matrix(torch.randn(4, 256, 64, generator=generator))
    off = independent[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 0.02
    assert torch.allclose(independent.diagonal(), torch.ones(4, dtype=torch.float64))


def test_permuted_copy_has_low_raw_but_full_matched_similarity():
    gate, up, down = random_expert(0)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    a = unit_vectors(gate, up, down)
    b = unit_vectors(gate[perm], up[perm], down[:, perm])
    flat = lambda *w: torch.cat([x.flatten() for x in w])  # noqa: E731
    raw = cosine_matrix(torch.stack([flat(gate, up, down), flat(gate[perm], up[perm], down[:, perm])]))[0, 1]
    identity, matched = matched_unit_similarity(a, b)
    assert raw < 0.2 and identity < 0.2
    assert matched == pytest.approx(1.0, abs=1e-6)


def test_independent_experts_match_only_at_chance_level():
    a = unit_vectors(*random_expert(0))
    b = unit_vectors(*random_expert(1))
    identity, matched = matched_unit_similarity(a, b)
    chance = chance_matched_similarity(a, 48)
    assert abs(identity) < 0.05
    assert 0.1 < chance < 0.35  # matching always finds something at this size...
    assert abs(matched - chance) < 0.05  # ...and for unrelated experts no more than chance
    assert layer_verdict(identity, matched, chance) == "unrelated"


def test_expert_pairs_cover_every_expert_twice():
    assert expert_pairs(2) == [(0, 1)]
    pairs = expert_pairs(8)
    assert len(pairs) == 8 and all(sum(e in pair for pair in pairs) == 2 for e in range(8))


def test_layer_verdict_thresholds():
    assert layer_verdict(0.9, 0.9, 0.2) == "aligned"
    assert layer_verdict(0.05, 0.9, 0.2) == "permuted"
    assert layer_verdict(0.0, 0.25, 0.2) == "unrelated"


def test_normalized_entropy():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert torch.allclose(normalized_entropy(probs), torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))


# -- models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upcycled_moe(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("upcycled")
    # Sparse upcycling in miniature: every expert = one ancestor + its own small noise.
    return {
        layout: make_mixtral(root / layout, tokenizer_dir, identical=True, upcycle_noise=0.3, layout=layout)
        for layout in ("legacy", "fused")
    }


def test_verdict_differs_between_upcycled_and_independent_experts(upcycled_moe, random_moe):
    upcycled = inspect_moe(str(upcycled_moe["legacy"]))
    independent = inspect_moe(str(random_moe["legacy"]))
    assert upcycled.verdict == "aligned" and independent.verdict == "unrelated"
    assert "router_weighted" in upcycled.suggested_methods
    assert "router_weighted" not in independent.suggested_methods
    assert "single_expert" in independent.suggested_methods
    assert "WARNING" in independent.message
    for layer in upcycled.layers:
        assert all(layer.weight_cosine[p] > 0.8 for p in ("gate", "up", "down"))
        assert layer.unit_identity == pytest.approx(layer.unit_matched, abs=1e-6)
    for layer in independent.layers:
        assert all(abs(layer.weight_cosine[p]) < 0.1 for p in ("gate", "up", "down"))
        assert len(layer.expert_cosine) == 4 and layer.expert_cosine[1][1] == pytest.approx(1.0)


@pytest.mark.parametrize("fixture", ["upcycled_moe", "random_moe"])
def test_both_checkpoint_layouts_give_the_same_report(fixture, request):
    models = request.getfixturevalue(fixture)
    legacy, fused = (inspect_moe(str(models[layout])).to_dict() for layout in ("legacy", "fused"))
    assert legacy.pop("model") != fused.pop("model")
    assert legacy == fused  # same tensors, same arithmetic


def test_router_usage_from_data_and_from_stats_agree(random_moe, calib_dir, tmp_path):
    path = str(random_moe["legacy"])
    from_data = inspect_moe(path, InspectSettings(data=str(calib_dir), num_samples=4, seq_len=32))
    source = SourceModel.open(ModelReference.parse(path))
    calibration = CalibrationConfig(
        dataset=str(calib_dir), num_samples=4, seq_len=32, batch_size=4, max_token_samples=0, engine="full"
    )
    _, batches = load_calibration_batches(path, calibration)
    stats = collect_statistics(source, batches, calibration, progress=False)
    stats.metadata["model_fingerprint"] = source.fingerprint(source.moe_layers())
    stats.save(tmp_path / "router_stats.safetensors")
    from_stats = inspect_moe(path, InspectSettings(stats_path=str(tmp_path / "router_stats.safetensors")))
    assert from_data.router_tokens == from_stats.router_tokens == stats.tokens > 0
    for a, b in zip(from_data.layers, from_stats.layers):
        assert sum(a.selection_share) == pytest.approx(1.0)
        assert a.selection_share == pytest.approx(b.selection_share)
        assert 0 < a.routing_entropy <= 1 and a.routing_entropy == pytest.approx(b.routing_entropy)
    assert inspect_moe(path).layers[0].selection_share is None


def test_layerwise_engine_gives_the_same_report_as_full(random_moe, calib_dir, tmp_path, monkeypatch):
    """`inspect --engine layerwise` calibrates on the layer stream (the spy) and reports what
    the whole-model engine reports."""
    from mergekit_moe2dense.calibration import engine

    path = str(random_moe["fused"])
    full = inspect_moe(path, InspectSettings(data=str(calib_dir), num_samples=4, seq_len=32, engine="full")).to_dict()
    streamed_runs = []
    streamed = engine._collect_layerwise
    monkeypatch.setattr(
        engine, "_collect_layerwise", lambda *a, **k: streamed_runs.append(k["stream"].dtype) or streamed(*a, **k)
    )
    result = run_cli(
        path,
        "--data",
        calib_dir,
        "--num-samples",
        4,
        "--seq-len",
        32,
        "--engine",
        "layerwise",
        "--json",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    assert streamed_runs == [torch.float32]
    layerwise = json.loads((tmp_path / "r.json").read_text())
    assert layerwise["router_tokens"] == full["router_tokens"] > 0
    for a, b in zip(layerwise.pop("layers"), full.pop("layers")):
        assert a.pop("selection_share") == pytest.approx(b.pop("selection_share"), abs=1e-9)
        assert a.pop("routing_entropy") == pytest.approx(b.pop("routing_entropy"), abs=1e-6)
        assert a == b
    assert layerwise == full


# -- command line -----------------------------------------------------------------------


def run_cli(*args):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def test_cli_prints_table_and_writes_png_and_json(upcycled_moe, calib_dir, tmp_path):
    png, report = tmp_path / "cos.png", tmp_path / "report.json"
    result = run_cli(
        upcycled_moe["fused"],
        "--data",
        calib_dir,
        "--num-samples",
        4,
        "--seq-len",
        32,
        "--heatmap",
        png,
        "--json",
        report,
    )
    assert result.exit_code == 0, result.output
    assert "verdict: aligned" in result.output
    assert result.output.strip().splitlines()[-2:] == [
        "recommended for a dense model: router_weighted (aggregate: mean_logit, refit: down_proj), as configs/aligned.yml",
        "write it as a config to run with --write-config PATH",
    ]
    assert "suggested methods" not in result.output  # one recommendation, not a list
    assert "entropy" in result.output and result.output.count("aligned") >= 3  # two layer rows and the verdict
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(report.read_text())
    assert payload["verdict"] == "aligned" and [layer["layer"] for layer in payload["layers"]] == [0, 1]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--stats", "x.safetensors", "--data", "y"], "--stats or --data"),
        (["--heatmap", "/nonexistent/dir/cos.png"], "does not exist"),
        (["--stats", "missing.safetensors"], "statistics file not found"),
        (["--data", "x.txt", "--num-samples", "0"], "num_samples"),
        (["--max-units", "0"], "max_units"),
        (["--engine", "layerwise"], "give --data"),
    ],
)
def test_cli_errors_are_one_line(random_moe, args, fragment):
    result = run_cli(random_moe["legacy"], *args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert fragment in result.output and result.output.count("Error") == 1


def test_cli_refuses_statistics_of_another_model(random_moe, upcycled_moe, tmp_path):
    from mergekit_moe2dense.calibration import RouterStatistics

    stats = RouterStatistics(layers=[0, 1], num_experts=4, top_k=2, tokens=10)
    stats.metadata["model_fingerprint"] = {
        "model_type": "mixtral",
        "layers": [0, 1],
        "num_experts": 4,
        "content_sha256": "other weights",
    }
    stats.save(tmp_path / "s.safetensors")
    result = run_cli(random_moe["legacy"], "--stats", tmp_path / "s.safetensors", "--json", tmp_path / "r.json")
    assert result.exit_code != 0 and "not on this model" in result.output
    assert not (tmp_path / "r.json").exists()


def open_model_fails(*args, **kwargs):
    pytest.fail("the model was opened")


@pytest.mark.parametrize("name, shown", [("cos.safetensors", r"\.safetensors"), ("cos", "no extension")])
def test_heatmap_format_is_refused_before_the_model_is_read(random_moe, tmp_path, monkeypatch, name, shown):
    monkeypatch.setattr(SourceModel, "open", open_model_fails)
    result = run_cli(random_moe["legacy"], "--heatmap", tmp_path / name)
    assert_one_line_error(result, rf"--heatmap .*{name}: {shown} is not an image format .*\.png, .*\.svg")
    assert list(tmp_path.iterdir()) == []


def test_heatmap_is_written_in_the_format_of_its_extension(random_moe, tmp_path):
    result = run_cli(random_moe["legacy"], "--heatmap", tmp_path / "cos.PDF")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cos.PDF").read_bytes()[:5] == b"%PDF-"
    assert [path.name for path in tmp_path.iterdir()] == ["cos.PDF"]


@pytest.mark.parametrize(
    "device, fragment",
    [
        pytest.param(
            "cuda",
            "--device cuda: CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        ("tpu", "--device tpu: not a device torch knows"),
    ],
)
def test_unusable_device_is_refused_before_the_model_is_read(random_moe, monkeypatch, device, fragment):
    monkeypatch.setattr(SourceModel, "open", open_model_fails)
    assert_one_line_error(run_cli(random_moe["legacy"], "--device", device), fragment)


def test_heatmap_scales_to_the_data_numbers_the_experts_and_fits_its_title(upcycled_moe):
    """An upcycled model's cosines all lie near 1: the colour scale spans them (and says so), each
    expert has a tick, and the title (a long model path) stays inside the picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    report = inspect_moe(str(upcycled_moe["legacy"]))
    report.model = "/models/an-organisation/" + "a-long-checkpoint-name-" * 6 + "moe"  # wider than the figure
    off_diagonal = [
        c for layer in report.layers for i, row in enumerate(layer.expert_cosine) for j, c in enumerate(row) if i != j
    ]
    figure = heatmap_figure(report)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    panels = [ax for ax in figure.axes if ax.images]
    low, high = panels[0].images[0].get_clim()
    assert low <= min(off_diagonal) and max(off_diagonal) <= high
    assert high - low <= 1.1 * (max(off_diagonal) - min(off_diagonal)) + 0.003  # not the fixed -1..1
    colorbar = figure.axes[-1]
    assert f"{low:.3f} to {high:.3f}" in colorbar.get_ylabel()
    for ax in panels:
        assert [label.get_text() for label in ax.get_xticklabels()] == ["0", "1", "2", "3"]
        assert [label.get_text() for label in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    title = figure.get_suptitle()
    assert "".join(title.split()) == "".join(f"{report.model}: aligned".split())  # wrapped, not cut
    (shown,) = [text for text in figure.texts if text.get_text() == title]
    box = shown.get_window_extent(canvas.get_renderer())
    assert 0 <= box.x0 and box.x1 <= figure.bbox.x1 and box.y1 <= figure.bbox.y1
