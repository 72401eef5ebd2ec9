# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The command line behaves the same across its commands: instant help, the same flags
(--version, --quiet, -h) everywhere, mergekit's options as mergekit declares them (the refused
ones hidden but still refused), one perplexity computation, readable training logs."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import click
import pytest
import torch
import transformers
from click.testing import CliRunner

from helpers import assert_one_line_error, convert_uniform, make_mixtral, run_cli, write_config
from mergekit_moe2dense import __version__, cli
from mergekit_moe2dense.cli_options import MERGEKIT_OPTIONS, merge_options
from mergekit_moe2dense.options import REFUSED

COMMANDS = ["merge", "eval", "inspect", "heal", "collapse"]
REFUSED_FLAGS = ["--allow-crimes", "--unsafe-truncate-embeddings", "--lora-merge-cache", "--lora-merge-dtype",
                 "--gpu-rich", "--multi-gpu", "--read-to-gpu"]  # fmt: skip


def command(name: str) -> click.Command:
    return cli.main.get_command(click.Context(cli.main), name)


@pytest.mark.parametrize("args", [["--help"], ["merge", "--help"], ["eval", "-h"], ["heal", "--help"], ["--version"]])
def test_help_imports_neither_torch_nor_mergekit(args):
    """Drawing the help (or the version) is instant: nothing heavy is imported for it."""
    code = (
        "import sys\nfrom mergekit_moe2dense.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as done:\n    assert not done.code, done.code\n"
        "print(sorted(m for m in ('torch', 'mergekit', 'transformers') if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"
    assert "Usage:" in done.stdout or __version__ in done.stdout


def test_merge_options_are_mergekits():
    """Each mergekit option is declared as mergekit's `add_merge_options` declares it, and the
    command gets the `MergeOptions` mergekit's decorator would build."""
    from mergekit.options import MergeOptions, add_merge_options

    theirs = {p.name: p for p in add_merge_options(lambda **kw: kw).__click_params__}
    ours = {p.name: p for p in merge_options(lambda **kw: kw).__click_params__}
    assert list(ours) == list(theirs) == [spec.name for spec in reversed(MERGEKIT_OPTIONS)]  # click's order
    for name, param in ours.items():
        other = theirs[name]
        facts = ("opts", "secondary_opts", "default", "is_flag", "count", "help", "show_default")
        assert [getattr(param, f) for f in facts] == [getattr(other, f) for f in facts], name
        assert param.type.name == other.type.name, name
        assert param.hidden == (name in REFUSED), name
    received = {}
    wrapped = click.command()(merge_options(lambda merge_options: received.update(options=merge_options)))
    assert CliRunner().invoke(wrapped, ["--out-shard-size", "1M", "-vv", "--cuda"]).exit_code == 0
    assert received["options"] == MergeOptions(out_shard_size=1_000_000, verbosity=2, cuda=True)


def test_merge_help_hides_the_refused_options_and_still_refuses_them(random_moe, calib_dir, tmp_path):
    help_text = run_cli("merge", "--help").output
    assert "--out-shard-size" in help_text and "--cuda" in help_text
    for flag in REFUSED_FLAGS:
        assert flag not in help_text
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir)
    assert_one_line_error(
        run_cli(config, tmp_path / "out", "--allow-crimes"), "--allow-crimes is not supported.*architectures"
    )
    assert_one_line_error(run_cli(config, tmp_path / "out", "--gpu-rich"), "--gpu-rich is not supported")
    assert not (tmp_path / "out").exists()


def test_top_level_help_says_merge_is_the_default():
    result = run_cli("--help")
    assert result.exit_code == 0
    assert "`merge` is the default command" in result.output
    assert all(name in result.output for name in COMMANDS)


@pytest.mark.parametrize("args", [[], *[[name] for name in COMMANDS]])
def test_version_on_every_command(args):
    result = run_cli(*args, "--version")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"mergekit-moe2dense, version {__version__}"


def test_the_shared_flags_are_on_every_command():
    """--quiet (no progress bars), -h and --version, the same on each command."""
    for name in COMMANDS:
        context = click.Context(command(name), parent=click.Context(cli.main))
        flags = {opt for param in command(name).get_params(context) for opt in param.opts}
        assert {"--quiet", "--version", "-h", "--help"} <= flags, name


def test_mergekit_yaml_into_a_non_empty_out_names_what_works_there(random_moe, calib_dir, tmp_path):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir, method="expert_uniform")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(mergekit_yaml, [str(config), str(out)])
    assert_one_line_error(result, "not empty.*remove it or choose another OUT_PATH")
    assert "pass --overwrite" not in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_eval_quiet_draws_no_bar(random_moe, calib_dir):
    result = run_cli("eval", random_moe["legacy"], "--data", calib_dir, "--seq-len", 16, "--quiet")
    assert result.exit_code == 0, result.output
    assert "window" not in result.output and str(random_moe["legacy"]) in result.output


def test_heal_reports_the_perplexity_eval_reports(tmp_path, tokenizer_dir, calib_dir):
    """Before and after, heal's held-out perplexity is eval's on the same model, data and
    --seq-len: the student is scored as stored (here bfloat16), not in the training dtype."""
    from mergekit_moe2dense import EvalSettings, HealSettings, TrainSettings, evaluate, heal

    teacher = make_mixtral(tmp_path / "teacher", tokenizer_dir, seed=3)
    student = convert_uniform(teacher, tmp_path / "student32", calib_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "student")
    transformers.AutoTokenizer.from_pretrained(student).save_pretrained(tmp_path / "student")
    held_out = calib_dir / "mixed.txt"
    training = TrainSettings(max_tokens=2 * 32, seq_len=32, batch_size=2, lr=1e-2, warmup=0.0)
    settings = HealSettings(
        student=str(tmp_path / "student"), teacher=str(teacher), data=str(held_out), eval_data=str(held_out),
        training=training,
    )  # fmt: skip
    result = heal(settings, str(tmp_path / "healed"), progress=False)

    def eval_perplexity(model_dir) -> float:
        report = evaluate([str(model_dir)], EvalSettings(data=(str(held_out),), seq_len=32), progress=False)
        return report.perplexity[0].perplexity

    assert result.perplexity_before == eval_perplexity(tmp_path / "student")
    assert result.perplexity_after == eval_perplexity(tmp_path / "healed")
    assert result.perplexity_after != result.perplexity_before  # the step trained


def test_training_logs_are_lines_of_numbers(capsys):
    from mergekit_moe2dense.training.trainer import LogPrinter, format_log

    logs = {"loss": 2.34567, "grad_norm": 0.5, "learning_rate": 9.5e-05, "tokens_per_s": 1234.5, "epoch": 0.1}
    assert format_log(logs, 10, 100) == (
        "step 10/100: loss 2.346, grad_norm 0.5, learning_rate 9.5e-05, tokens_per_s 1234"
    )
    state = SimpleNamespace(is_local_process_zero=True, global_step=3, max_steps=6)
    LogPrinter().on_log(None, state, None, logs={"loss": 1.0, "total_flos": 5.0})
    assert capsys.readouterr().out == "step 3/6: loss 1\n"


def test_prune_and_merge_bars_say_what_they_do():
    from mergekit_moe2dense.outputs.pruned import _progress_label

    assert _progress_label(SimpleNamespace(groups=(((0,), (2,)),)), 2) == "Pruning experts to 2 per layer"
    assert _progress_label(SimpleNamespace(groups=(((0, 1), (2,)),)), 2) == "Merging experts to 2 per layer"


def test_inspect_stats_takes_the_out_of_an_earlier_run_as_merge_does(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    out = tmp_path / "dense"
    assert run_cli(write_config(tmp_path / "c.yml", moe, calib_dir), out, "--quiet").exit_code == 0
    result = run_cli("inspect", moe, "--stats", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "router" in result.output.lower()


def test_inspect_caps_its_default_seq_len_at_a_short_context_and_refuses_a_given_one(
    tokenizer_dir, calib_dir, tmp_path, caplog
):
    short = make_mixtral(tmp_path / "short", tokenizer_dir, max_position_embeddings=64)
    with caplog.at_level("WARNING", logger="mergekit_moe2dense.inspection"):
        result = run_cli("inspect", short, "--data", calib_dir, "--num-samples", 2, "--quiet")
    assert result.exit_code == 0, result.output
    assert "--seq-len 64" in caplog.text
    assert_one_line_error(
        run_cli("inspect", short, "--data", calib_dir, "--seq-len", 128, "--quiet"), "max_position_embeddings 64"
    )
