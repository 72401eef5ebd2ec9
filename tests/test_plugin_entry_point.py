# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Our `mergekit.plugins` entry point, and the `.pth` hook standing aside where it is in use.

The last test needs a mergekit that loads plugins (upstream/'s patches); it is skipped
elsewhere, and scripts/upstream_check.sh runs it with the patched mergekit installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import transformers
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions

from helpers import BIN, write_config

ROOT = Path(__file__).resolve().parent.parent
GROUP = "mergekit.plugins"


def declared_entry_point() -> importlib.metadata.EntryPoint:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    ((name, value),) = declared.items()
    return importlib.metadata.EntryPoint(name, value, GROUP)


def load_hook():
    """plugin/mergekit_moe2dense_hook.py of this checkout, as a module of its own name."""
    import mergekit.merge  # noqa: F401  (imported first, so loading the hook adds no import finder)

    spec = importlib.util.spec_from_file_location(
        "moe2dense_hook_under_test", ROOT / "plugin/mergekit_moe2dense_hook.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run_merge_module() -> types.ModuleType:
    module = types.ModuleType("fake_mergekit_merge")

    def run_merge(merge_config, out_path, options, config_source=None):
        return "mergekit"

    module.run_merge = run_merge
    return module


def merge_config(source: str) -> MergeConfiguration:
    return MergeConfiguration.model_validate(yaml.safe_load(source))


def test_pyproject_declares_the_entry_point_the_hook_looks_for():
    from mergekit_moe2dense import mergekit_plugin

    entry_point = declared_entry_point()
    assert entry_point.load() is mergekit_plugin.setup
    assert entry_point.module == load_hook().ENTRY_POINT_MODULE


def test_plugin_registers_our_methods_and_claims_only_their_configs(random_moe, calib_dir, tmp_path):
    from mergekit.merge_methods import registry

    from mergekit_moe2dense.methods import METHODS

    handler = declared_entry_point().load()()
    assert {name: registry.get(name).spec.name for name in METHODS} == {name: name for name in METHODS}
    ours = write_config(tmp_path / "ours.yml", random_moe["legacy"], calib_dir).read_text()
    assert handler.handles(merge_config(ours))
    linear = yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(random_moe["legacy"])}]})
    assert not handler.handles(merge_config(linear))


def test_plugin_runs_the_conversion_with_the_yaml_source(random_moe, calib_dir, tmp_path):
    source = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, method="top_k_tempered").read_text()
    out = tmp_path / "out"
    # mergekit's config model drops `calibration:`; the handler takes it from the source
    declared_entry_point().load()().run(merge_config(source), str(out), MergeOptions(quiet=True), source)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "MistralForCausalLM"
    assert (out / "moe2dense" / "router_stats.safetensors").is_file()
    assert len(json.loads((out / "expert_weights.json").read_text())["layers"]) == 2


def test_hook_wraps_run_merge_only_without_plugin_loading(tmp_path, monkeypatch):
    hook = load_hook()
    # our distribution as installed: its metadata declares the entry point
    dist_info = tmp_path / "mergekit_moe2dense_probe-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: mergekit-moe2dense-probe\nVersion: 0.1\n")
    entry_point = declared_entry_point()
    (dist_info / "entry_points.txt").write_text(f"[{GROUP}]\n{entry_point.name} = {entry_point.value}\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    monkeypatch.setitem(sys.modules, "mergekit.plugins", None)  # mergekit 0.1.5: no such module
    old = fake_run_merge_module()
    hook.patch_run_merge(old)
    assert old.run_merge._moe2dense

    monkeypatch.setitem(sys.modules, "mergekit.plugins", types.SimpleNamespace(load_plugins=lambda: ()))
    new = fake_run_merge_module()
    original = new.run_merge
    hook.patch_run_merge(new)
    assert new.run_merge is original


@pytest.mark.slow  # console scripts in a subprocess
@pytest.mark.skipif(
    importlib.util.find_spec("mergekit.plugins") is None,
    reason="this mergekit loads no plugins (scripts/upstream_check.sh runs it with upstream/'s patches)",
)
def test_mergekit_yaml_runs_our_config_through_the_entry_point(random_moe, calib_dir, tmp_path):
    import mergekit.merge
    import mergekit.plugins

    from mergekit_moe2dense.mergekit_plugin import Moe2DenseHandler

    assert not getattr(mergekit.merge.run_merge, "_moe2dense", False), "the .pth hook wrapped run_merge"
    (ours,) = [p for p in mergekit.plugins.load_plugins() if p.value == declared_entry_point().value]
    assert isinstance(ours.handler, Moe2DenseHandler)

    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, method="router_weighted")
    out = tmp_path / "out"
    done = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(config), str(out), "--quiet"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "MistralForCausalLM"
    assert (out / "expert_weights.json").is_file() and (out / "moe2dense" / "router_stats.safetensors").is_file()

    # without plugin loading nothing routes our config (the hook stands aside): the run above
    # went through the entry point
    refused = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(config), str(tmp_path / "out2"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, mergekit.plugins.DISABLE_ENV_VAR: "1"},
    )
    assert refused.returncode != 0, refused.stderr[-3000:]
    assert "Unimplemented merge method router_weighted" in refused.stderr, refused.stderr[-3000:]
