# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Make `mergekit-yaml` run our methods on a mergekit without plugin loading.

A mergekit that loads the `mergekit.plugins` entry-point group (the change proposed in
upstream/) finds our entry point (mergekit_moe2dense/mergekit_plugin.py) and needs nothing
from here. mergekit 0.1.5 as released loads no plugins, and its planner cannot turn an MoE
into a dense model, so for it `mergekit-yaml` must be routed to our planner. The wheel
installs a one-line `.pth` file that imports this module at interpreter start. It lives
outside the package (importing the package loads torch and mergekit) and imports
nothing heavy: it only adds an import hook that, once `mergekit.merge` has been
executed, wraps `mergekit.merge.run_merge` (before `mergekit.scripts.run_yaml`
binds it). The wrapper sends configs whose `merge_method` is one of ours to
`mergekit_moe2dense.cli_errors.run_mergekit_config` (the conversion, its errors as
mergekit-yaml's one-line message) and everything else to mergekit unchanged. Where
mergekit loads plugins and our entry point is declared, nothing is wrapped, so a config
is never routed twice. Nothing in mergekit's files is modified, so
upgrading or reinstalling either package cannot leave a half-patched install; should
mergekit rename `run_merge`, the hook does nothing and `mergekit-moe2dense` still works.
"""

import functools
import importlib
import importlib.abc
import sys

TARGET = "mergekit.merge"
ENTRY_POINT_GROUP = "mergekit.plugins"
ENTRY_POINT_MODULE = "mergekit_moe2dense.mergekit_plugin"


def entry_point_in_use() -> bool:
    """Whether this mergekit loads plugins and our entry point is declared: then mergekit
    itself routes our configs (called once `mergekit.merge` is imported, so cheaply)."""
    import importlib.metadata

    try:
        plugins = importlib.import_module("mergekit.plugins")
    except ImportError:
        return False
    if not hasattr(plugins, "load_plugins"):
        return False
    declared = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return any(ep.value.split(":")[0].strip() == ENTRY_POINT_MODULE for ep in declared)


def patch_run_merge(module) -> None:
    original = getattr(module, "run_merge", None)
    if original is None or getattr(original, "_moe2dense", False) or entry_point_in_use():
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None, **kwargs):
        from mergekit_moe2dense.methods import METHODS, register_methods

        register_methods()
        if merge_config.merge_method not in METHODS:
            return original(merge_config, out_path, options, config_source=config_source, **kwargs)
        from mergekit_moe2dense.cli_errors import run_mergekit_config

        return run_mergekit_config(merge_config, out_path, options, config_source)

    run_merge._moe2dense = True
    module.run_merge = run_merge


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds `mergekit.merge` with the other finders, then patches it once executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch_run_merge(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    if TARGET in sys.modules:
        patch_run_merge(sys.modules[TARGET])
    elif not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


install()
