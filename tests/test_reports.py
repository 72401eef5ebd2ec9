# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Report files (`eval --json`, `inspect --json`/`--heatmap`) never land on an input, and a
report path holds its old content or the whole new report, never a partial one."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from helpers import assert_one_line_error, run_cli
from mergekit_moe2dense import report_files
from mergekit_moe2dense.report_files import ReportFileError, atomic_report, check_reports, write_report_text


@pytest.fixture
def moe(random_moe, tmp_path):
    """A private copy of the tiny MoE: a command that damaged it would harm no other test."""
    return shutil.copytree(random_moe["legacy"], tmp_path / "moe")


def snapshot(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def fail_if_called(*args, **kwargs):
    pytest.fail("the command started its work")


# -- a report never lands on an input ------------------------------------------------------


@pytest.mark.parametrize(
    "report, relation",
    [
        ("moe/config.json", "is inside the model"),  # replacing it would leave a model that no longer loads
        ("moe/results.json", "is inside the model"),
        ("data/c.txt", "is the --data"),
        ("texts/r.json", "is inside the --data"),
        ("link.json", "is inside the model"),  # a symbolic link to the model's config
        ("tasks/scores.json", "is inside the --tasks"),
    ],
)
def test_eval_refuses_a_report_on_an_input_before_any_work(moe, tmp_path, monkeypatch, report, relation):
    import mergekit_moe2dense.perplexity as evaluate

    monkeypatch.setattr(evaluate, "evaluate_models", fail_if_called)
    for name in ("data", "texts", "tasks"):
        (tmp_path / name).mkdir()
    (tmp_path / "data" / "c.txt").write_text("the text to score\n")
    (tmp_path / "texts" / "t.txt").write_text("more text to score\n")
    (tmp_path / "link.json").symlink_to(moe / "config.json")
    before = [snapshot(tmp_path / name) for name in ("moe", "data", "texts", "tasks")]
    tasks = ["--tasks", f"hellaswag,{tmp_path / 'tasks'}"] if report.startswith("tasks") else []
    target = tmp_path / report
    result = run_cli(
        "eval", moe, "--data", tmp_path / "data" / "c.txt", "--data", tmp_path / "texts", *tasks, "--json", target
    )
    assert_one_line_error(result, f"--json {target} {relation}")
    assert [snapshot(tmp_path / name) for name in ("moe", "data", "texts", "tasks")] == before


@pytest.mark.parametrize(
    "flag, name, relation",
    [
        ("--json", "moe/config.json", "is inside the model"),
        ("--heatmap", "moe/cos.png", "is inside the model"),
        ("--json", "stats.safetensors", "is the --stats file"),
        ("--json", "data/r.json", "is inside the --data"),
    ],
)
def test_inspect_refuses_a_report_on_an_input(moe, tmp_path, flag, name, relation):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "c.txt").write_text("calibration text " * 40)
    (tmp_path / "stats.safetensors").write_bytes(b"statistics")
    source = {
        "stats.safetensors": ["--stats", tmp_path / "stats.safetensors"],
        "data/r.json": ["--data", tmp_path / "data", "--num-samples", 2, "--seq-len", 16],
    }.get(name, [])
    before = snapshot(moe), snapshot(tmp_path / "data"), (tmp_path / "stats.safetensors").read_bytes()
    result = run_cli("inspect", moe, *source, flag, tmp_path / name)
    assert_one_line_error(result, f"{flag} {tmp_path / name} {relation}")
    assert (snapshot(moe), snapshot(tmp_path / "data"), (tmp_path / "stats.safetensors").read_bytes()) == before


def test_inspect_refuses_two_reports_on_one_path(moe, tmp_path):
    both = tmp_path / "r.png"
    assert_one_line_error(run_cli("inspect", moe, "--heatmap", both, "--json", both), "--json .* is also --heatmap")
    assert not both.exists()


def test_inputs_that_are_not_paths_are_skipped(tmp_path, monkeypatch):
    """A datasets name is no path, nor is the empty item of `--tasks hellaswag,` (as a path it
    would be the working directory, and every report in it refused)."""
    monkeypatch.chdir(tmp_path)
    check_reports({"--json": "r.json", "--heatmap": None}, [("--data", "wikitext"), ("--tasks", "")])
    with pytest.raises(ReportFileError, match="is inside the --tasks"):
        check_reports({"--json": "r.json"}, [("--tasks", ".")])


# -- reports are written whole or not at all -------------------------------------------------


def test_a_report_is_written_whole_with_the_usual_permissions(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    write_report_text(path, "new report\n")
    assert path.read_text() == "new report\n" and os.listdir(tmp_path) == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not the temporary file's 0600


def test_a_failed_report_keeps_the_old_one_and_leaves_nothing(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_report(path) as temporary:
        with open(temporary, "w") as handle:
            handle.write("half a rep")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_eval_json_that_cannot_be_written_keeps_the_old_file(random_moe, calib_dir, tmp_path, monkeypatch):
    path = tmp_path / "ppl.json"
    path.write_text("earlier results")
    monkeypatch.setattr(report_files.os, "replace", no_space)
    result = run_cli("eval", random_moe["legacy"], "--data", calib_dir, "--seq-len", 16, "--json", path)
    assert_one_line_error(result, f"cannot write {path} \\(No space left on device\\)")
    assert path.read_text() == "earlier results" and os.listdir(tmp_path) == ["ppl.json"]


def test_inspect_reports_that_cannot_be_written_keep_the_old_files(random_moe, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    png, report = tmp_path / "cos.png", tmp_path / "r.json"
    png.write_bytes(b"earlier heatmap")
    report.write_text("earlier report")

    def half_then_full(self, path, **kwargs):  # the disk fills up halfway through the image
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half")
        no_space()

    monkeypatch.setattr(Figure, "savefig", half_then_full)
    result = run_cli("inspect", random_moe["legacy"], "--heatmap", png)
    assert_one_line_error(result, "cannot write .*cos.png \\(No space left on device\\)")
    monkeypatch.setattr(report_files.os, "replace", no_space)
    assert_one_line_error(run_cli("inspect", random_moe["legacy"], "--json", report), "cannot write .*r.json")
    assert png.read_bytes() == b"earlier heatmap" and report.read_text() == "earlier report"
    assert sorted(os.listdir(tmp_path)) == ["cos.png", "r.json"]


def test_check_reports_refuses_through_a_symlinked_directory(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "model")
    with pytest.raises(ReportFileError, match="is inside the model"):
        check_reports({"--json": str(tmp_path / "alias" / "r.json")}, [("model", str(tmp_path / "model"))])
