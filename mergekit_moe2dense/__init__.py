# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit-moe2dense: merge the experts of a Mixture-of-Experts LLM into a dense model.

Importing the package registers its merge methods with mergekit's registry.
"""

from mergekit_moe2dense.methods import METHODS, get_method, register_methods

register_methods()

__all__ = ["METHODS", "get_method", "register_methods"]
__version__ = "0.1.0"
