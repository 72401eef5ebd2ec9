# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`python -m mergekit_moe2dense ...` is `mergekit-moe2dense ...`."""

from mergekit_moe2dense.cli import main

main()
