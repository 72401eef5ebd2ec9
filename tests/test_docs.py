# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""scripts/check_docs.py: what the documentation quotes (commands, flags, files, configs) is
current, and the checker catches each kind of drift."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", REPO / "scripts" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    yield module
    del sys.modules["check_docs"]


def problems_in(check_docs, tmp_path, text: str) -> list[str]:
    page = tmp_path / "page.md"
    page.write_text(text)
    checker = check_docs.Checker()
    checker.check_file(page)
    return checker.problems


def test_readme_changelog_and_every_docs_page_are_current(check_docs, capsys):
    assert check_docs.main([]) == 0, capsys.readouterr().out


def test_current_commands_paths_and_configs_pass(check_docs, tmp_path):
    text = """
```bash
mergekit-moe2dense configs/router_weighted.yml ./out --stats ./old --cuda --out-shard-size 1B
mergekit-moe2dense eval a b --data x/ --seq-len 128 --json r.json   # a comment --not-a-flag
torchrun --nproc-per-node 2 $(which mergekit-moe2dense) config.yml out --cuda
python benchmarks/quality.py --preset example --grid
```

Run `mergekit-moe2dense inspect MOE [--stats FILE | --data PATH]`; see
`tests/test_docs.py::test_current_commands_paths_and_configs_pass` and `configs/*.yml`.

```yaml
merge_method: concat
models:
  - model: path/to/moe
parameters:
  num_experts: 2
  refit: fit
  fit_steps: 10
```
"""
    assert problems_in(check_docs, tmp_path, text) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "`mergekit-moe2dense eval a --data x --no-such-flag`",
            "`mergekit-moe2dense eval` has no option --no-such-flag",
        ),
        ("`mergekit-moe2dense cfg.yml out --teacher t`", "`mergekit-moe2dense merge` has no option --teacher"),
        ("`mergekit-yaml cfg.yml out --stats s`", "`mergekit-yaml` has no option --stats"),
        ("`python benchmarks/quality.py --no-such-flag`", "`benchmarks/quality.py` has no option --no-such-flag"),
        ("`bash benchmarks/gpu_check.sh --no-such-flag`", "`benchmarks/gpu_check.sh` has no option --no-such-flag"),
        ("`python benchmarks/no_such_script.py`", "benchmarks/no_such_script.py does not exist"),
        ("see configs/no_such_config.yml", "configs/no_such_config.yml does not exist"),
        ("`tests/test_docs.py::test_no_such_test`", "tests/test_docs.py has no test test_no_such_test"),
        ("```yaml\nmerge_method: no_such_method\nmodels:\n  - model: m\n```", "unknown merge_method 'no_such_method'"),
        (
            "```yaml\nmerge_method: concat\nmodels:\n  - model: m\nparameters:\n  width: 2\n```",
            "concat has no parameter(s) width",
        ),
        ("```yaml\nmerge_method: concat\nmodels:\n  - model: m\ncalibraton:\n  dataset: d\n```", "calibraton"),
        (
            "```yaml\nmerge_method: router_weighted\nmodels:\n  - model: m\nparameters:\n  temperature: -1\n```",
            "temperature",
        ),
        ("As decided in Issue 13, part 2.", "'Issue 13': say what the project does"),
        ("Measured in the third session.", "'session': say what the project does"),
    ],
)
def test_each_kind_of_drift_is_reported(check_docs, tmp_path, text, expected):
    problems = problems_in(check_docs, tmp_path, text)
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith(str(tmp_path / "page.md") + ":")  # FILE:LINE names where
