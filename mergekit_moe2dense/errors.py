# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The root of every error the library raises for bad input.

The CLIs turn these (and only these) into one-line messages; anything else is a
bug and keeps its traceback.
"""


class Moe2DenseError(Exception):
    """Bad input: a config, model, dataset, statistics file or output path."""
