# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Nothing lost, nothing wrong: the output directory never touches an input, never
deletes what it did not see, and appears complete or not at all."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner
from mergekit.options import MergeOptions

from helpers import assert_one_line_error, dead_pid
from mergekit_moe2dense import output_dir
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.cli import main
from mergekit_moe2dense.config import Moe2DenseConfig
from mergekit_moe2dense.output_dir import (
    COLLAPSE_INFIX,
    DiskFullError,
    OutputDirectory,
    OutputError,
    OutputExistsError,
    OutputLockedError,
    make_working_directory,
    remove_working_directory,
)


def _config(model, calibration=None, method="expert_uniform"):
    data = {"merge_method": method, "models": [{"model": str(model)}], "dtype": "float32"}
    if calibration is not None:
        data["calibration"] = {"dataset": str(calibration), "num_samples": 4, "seq_len": 16, "batch_size": 2}
    return Moe2DenseConfig.model_validate(data)


def _tree(path):
    """Every file below `path` with its bytes: what must survive a refused run."""
    return {
        os.path.relpath(os.path.join(root, name), path): open(os.path.join(root, name), "rb").read()
        for root, _, files in os.walk(path)
        for name in files
    }


@pytest.fixture
def moe_copy(random_moe, tmp_path):
    """A private copy of a tiny MoE inside tmp_path/models, with an unrelated file beside it."""
    models = tmp_path / "models"
    moe = models / "moe"
    shutil.copytree(random_moe["legacy"], moe)
    (models / "notes.txt").write_text("not the model's")
    return moe


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_that_overlaps_the_model_is_refused_and_the_model_kept(moe_copy, where):
    out = {"same": moe_copy, "parent": moe_copy.parent, "inside": moe_copy / "dense"}[where]
    before = _tree(moe_copy.parent)
    result = CliRunner().invoke(
        main, ["merge", _write(moe_copy.parent.parent, _config(moe_copy)), str(out), "--overwrite"]
    )
    assert result.exit_code == 1
    assert "choose an OUT outside every input" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _tree(moe_copy.parent) == before
    assert not (moe_copy / "dense").exists()


def test_output_through_a_symlinked_parent_is_compared_by_real_path(moe_copy, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(moe_copy.parent)
    with pytest.raises(OutputError, match="is the source model"):
        build_dense(_config(moe_copy), str(link / "moe"), MergeOptions(quiet=True), overwrite=True)
    assert (moe_copy / "config.json").exists()


def test_output_overlapping_calibration_data_or_stats_is_refused(moe_copy, calib_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(calib_dir, data)
    with pytest.raises(OutputError, match="is the calibration data"):
        build_dense(_config(moe_copy, data), str(data), MergeOptions(quiet=True), overwrite=True)
    stats = tmp_path / "old" / "router_stats.safetensors"
    stats.parent.mkdir()
    stats.write_bytes(b"x")
    with pytest.raises(OutputError, match="contains the --stats file"):
        build_dense(
            _config(moe_copy), str(stats.parent), MergeOptions(quiet=True), stats_path=str(stats), overwrite=True
        )
    assert stats.read_bytes() == b"x" and (data / "mixed.txt").exists()


def test_symlink_output_is_refused_before_any_work(moe_copy, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    with pytest.raises(OutputError, match="symbolic link"):
        build_dense(_config(moe_copy), str(tmp_path / "out"), MergeOptions(quiet=True))


def test_unwritable_or_file_parent_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        OutputDirectory(str(tmp_path / "file" / "out")).check()
    monkeypatch.setattr(output_dir.os, "access", lambda path, mode: False)  # root ignores chmod
    with pytest.raises(OutputError, match="no permission"):
        OutputDirectory(str(tmp_path / "new" / "out")).check()


def test_second_run_on_the_same_output_is_refused_while_the_first_holds_it(tmp_path):
    first = OutputDirectory(str(tmp_path / "out"))
    with first:
        with pytest.raises(OutputLockedError, match=f"process {os.getpid()}"):
            OutputDirectory(str(tmp_path / "out")).__enter__()
        open(os.path.join(first.staging, "model.safetensors"), "w").close()
        first.publish()
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out.lock").exists()
    with OutputDirectory(str(tmp_path / "out"), overwrite=True):  # the lock is free again
        pass


def test_second_process_is_refused_while_a_run_holds_the_lock(tmp_path):
    script = (
        "import sys\nfrom mergekit_moe2dense.output_dir import OutputDirectory, OutputLockedError\n"
        f"try:\n    OutputDirectory({str(tmp_path / 'out')!r}).__enter__()\n"
        "except OutputLockedError as e:\n    print(e); sys.exit(3)\n"
    )
    with OutputDirectory(str(tmp_path / "out")):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert "is writing to" in done.stdout


def test_contents_that_appear_during_the_run_are_never_deleted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(OutputExistsError, match="changed while this run was working"):
        with OutputDirectory(str(out), overwrite=True) as run:
            open(os.path.join(run.staging, "model.safetensors"), "w").close()
            (out / "new.txt").write_text("written during the run")  # e.g. another tool, or a user
            run.publish()
    assert (out / "new.txt").read_text() == "written during the run" and (out / "old.bin").exists()
    kept = [p for p in tmp_path.iterdir() if ".unpublished-" in p.name]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if ".incomplete-" in p.name]


def test_output_created_by_someone_else_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError):
        with OutputDirectory(str(out)) as run:
            out.mkdir()
            (out / "theirs").write_text("")
            run.publish()
    assert (out / "theirs").exists()


def test_overwrite_replaces_what_was_seen(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with OutputDirectory(str(out), overwrite=True) as run:
        open(os.path.join(run.staging, "model.safetensors"), "w").close()
        run.publish()
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_working_directories_of_dead_runs_are_removed_and_nothing_else(tmp_path):
    dead = dead_pid()
    removed = [f"out.incomplete-{dead}", f"out.collapse-{dead}", f"out.incomplete-{dead}.2"]
    kept = [
        f"out.incomplete-{os.getppid()}",  # a live process's
        f"out.collapse-{os.getppid()}",
        "out.incomplete-x",
        f"other.incomplete-{dead}",
        f"out.unpublished-{dead}",  # a finished output: never removed
        f"out.replaced-{dead}",
    ]
    for name in removed + kept:
        (tmp_path / name).mkdir()
    with OutputDirectory(str(tmp_path / "out")):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_working_directories_of_a_run_killed_with_sigkill_are_removed_by_the_next_run(tmp_path):
    out = str(tmp_path / "out")
    script = (
        "import os, sys, time\nfrom mergekit_moe2dense.output_dir import OutputDirectory\n"
        f"run = OutputDirectory({out!r}).__enter__()\n"
        f"open(os.path.join(run.working_directory({COLLAPSE_INFIX!r}), 'model.safetensors'), 'w').close()\n"
        "open(os.path.join(run.staging, 'model.safetensors'), 'w').close()\n"
        "print('ready', flush=True)\ntime.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    child.kill()  # SIGKILL: no cleanup runs
    child.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"out.collapse-{child.pid}", f"out.incomplete-{child.pid}", "out.lock"])
    with OutputDirectory(out) as run:
        open(os.path.join(run.staging, "model.safetensors"), "w").close()
        run.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_directory_left_by_an_earlier_process_with_this_pid_is_stale(tmp_path):
    """PIDs repeat (in a container, a run is often the same PID every time)."""
    leftover = tmp_path / f"out.incomplete-{os.getpid()}"
    leftover.mkdir()
    (leftover / "half.safetensors").write_text("")
    with OutputDirectory(str(tmp_path / "out")) as run:
        assert os.listdir(run.staging) == []
        run.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_working_directories_of_one_process_are_distinct_and_removed(tmp_path):
    first = make_working_directory(str(tmp_path / "spill"), "acts-")
    second = make_working_directory(str(tmp_path / "spill"), "acts-")  # e.g. two streams at once
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert os.path.basename(first) == f"acts-{os.getpid()}"
    remove_working_directory(first)
    remove_working_directory(second)
    assert os.listdir(tmp_path / "spill") == []


def test_output_name_too_long_for_the_names_made_beside_it_is_refused_before_any_work(moe_copy, tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = len(".unpublished-9999999")
    fits = "o" * (limit - longest)
    (tmp_path / f"{fits}.unpublished-9999999").mkdir()  # the longest name made beside OUT fits
    with OutputDirectory(str(tmp_path / fits)) as run:
        run.publish()
    too_long = "é" * ((limit - longest) // 2 + 1)  # counted in bytes (2 each), not characters
    with pytest.raises(OutputError, match=f"is {len(too_long.encode())} bytes: .* choose a name of at most"):
        OutputDirectory(str(tmp_path / too_long)).check()
    result = CliRunner().invoke(main, ["merge", _write(tmp_path, _config(moe_copy)), str(tmp_path / too_long)])
    assert_one_line_error(result, f"exceeds the limit of {limit} bytes on a file name")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("é")]


def test_published_files_have_the_users_usual_permissions(random_moe, calib_dir, tmp_path):
    out = tmp_path / "dense"
    old = os.umask(0o022)
    try:
        build_dense(_config(random_moe["legacy"], calib_dir, "router_weighted"), str(out), MergeOptions(quiet=True))
    finally:
        os.umask(old)
    files = {p.relative_to(out).as_posix(): p for p in out.rglob("*")}
    modes = {name: stat.S_IMODE(os.stat(p).st_mode) for name, p in files.items() if p.is_file()}
    assert "model.safetensors" in modes and "moe2dense/router_stats.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(out / "moe2dense").st_mode) == 0o755


def test_disk_full_is_one_line_and_leaves_nothing(random_moe, tmp_path, monkeypatch):
    from mergekit_moe2dense.outputs import dense

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dense, "run_graph", full)
    with pytest.raises(
        DiskFullError, match=r"not enough space on the device of .*: the output needs at least .* GB is free"
    ):
        build_dense(_config(random_moe["legacy"]), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_real_disk_full_on_a_tiny_file_system(random_moe, tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = CliRunner().invoke(
            main, ["merge", _write(tmp_path, _config(random_moe["legacy"])), str(mount / "out")]
        )
        assert result.exit_code == 1, result.output
        assert "not enough space on the device" in result.output and "Traceback" not in result.output
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)])


def _write(directory, config) -> str:
    path = os.path.join(directory, "config.yml")
    with open(path, "w") as handle:
        handle.write(config.to_yaml())
    return path
