# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit-moe2dense: merge the experts of a Mixture-of-Experts LLM into a dense model.

Importing the package loads nothing heavy, so that the command line starts at once
and a Ctrl-C while torch loads is caught (cli.py). The merge methods are registered
with mergekit's registry when `METHODS`, `get_method` or `register_methods` is first
taken from here, and by our mergekit plugin (the `mergekit.plugins` entry point, or the
`.pth` hook where mergekit loads no plugins) before it routes a config to us.
"""

import os as _os

# The layer loops (calibration, re-fits) multiply matrices whose shapes change with every layer
# (the tokens each expert gets); oneDNN's primitive cache (bf16 matmuls on the CPU) kept memory
# for every new shape: ~4 MB more RSS per streamed layer, 0.12 GB at a 21-layer re-fit's peak
# (docs/benchmarks.md). Off unless the user set it; oneDNN reads it at its first use.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")

__all__ = ["METHODS", "get_method", "register_methods"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from mergekit_moe2dense import methods

        methods.register_methods()
        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
