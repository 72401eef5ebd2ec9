# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Our entry in mergekit's `mergekit.plugins` entry-point group (declared in pyproject.toml).

A mergekit that loads plugins (the change in upstream/, docs/plugins.md there) calls `setup`
once, before it plans a merge: it registers our methods in mergekit's registry and returns a
handler that claims every config whose `merge_method` is one of ours and runs it with
`build.build_from_mergekit`, its errors as mergekit-yaml's one-line message
(`cli_errors.run_mergekit_config`); mergekit plans everything else as before. For a mergekit
without the group (0.1.5 as released), plugin/mergekit_moe2dense_hook.py routes the same configs
by wrapping `run_merge`, and stands aside where this entry point is in use, so a config is
routed once.
"""

from __future__ import annotations

from mergekit_moe2dense.methods import METHODS, register_methods

__all__ = ["Moe2DenseHandler", "setup"]


class Moe2DenseHandler:
    """mergekit's `MergeHandler` protocol: `handles(config)`, then `run(...)` in place of its planner."""

    def handles(self, merge_config) -> bool:
        return merge_config.merge_method in METHODS

    def run(self, merge_config, out_path: str, options, config_source: str | None = None) -> None:
        from mergekit_moe2dense.cli_errors import run_mergekit_config

        run_mergekit_config(merge_config, out_path, options, config_source)


def setup() -> Moe2DenseHandler:
    register_methods()
    return Moe2DenseHandler()
