# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit-moe2dense: merge the experts of a Mixture-of-Experts LLM into a dense model.

Importing the package loads nothing heavy, so that the command line starts at once
and a Ctrl-C while torch loads is caught (cli.py). The merge methods are registered
with mergekit's registry when `METHODS`, `get_method` or `register_methods` is first
taken from here, and by our mergekit plugin (the `mergekit.plugins` entry point, or the
`.pth` hook where mergekit loads no plugins) before it routes a config to us.
"""

__all__ = ["METHODS", "get_method", "register_methods"]
__version__ = "0.1.0"


def __getattr__(name):
    if name in __all__:
        from mergekit_moe2dense import methods

        methods.register_methods()
        return getattr(methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
