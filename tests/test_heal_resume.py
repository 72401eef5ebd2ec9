# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`heal`'s checkpoints and `--resume`: only a complete checkpoint of the same run is resumed;
what cannot be resumed, a full disk, a broken model or an unusable device is one line; the
checkpoint directory, the throughput and the record are right after a resume or a failure."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil

import pytest
import torch
import transformers

from helpers import TEXT, StopAfterSave, assert_one_line_error, convert_uniform, make_mixtral, run_cli, state_of
from mergekit_moe2dense.training import HealError, HealSettings, TrainSettings, heal
from mergekit_moe2dense.training.trainer import RUN_RECORD

SEQ = 32
STEPS = 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir, calib_dir):
    """A tiny random Mixtral teacher, its uniform dense conversion as the student, training text."""
    root = tmp_path_factory.mktemp("heal_resume")
    teacher = make_mixtral(root / "teacher", tokenizer_dir, seed=3)
    student = convert_uniform(teacher, root / "student", calib_dir)
    return {"root": root, "teacher": teacher, "student": student, "data": calib_dir / "mixed.txt"}


def settings(**overrides) -> TrainSettings:
    values = dict(max_tokens=STEPS * 2 * SEQ, seq_len=SEQ, batch_size=2, lr=3e-3, logging_steps=1, save_steps=3)
    values.update(overrides)
    return TrainSettings(**values)


def run_heal(pair, out, *, student=None, callbacks=None, **options):
    overrides = {key: options.pop(key) for key in list(options) if key in TrainSettings.model_fields}
    return heal(
        HealSettings(student=str(student or pair["student"]), teacher=str(pair["teacher"]), data=str(pair["data"]),
                     training=settings(**overrides), **options),
        str(out), callbacks=callbacks, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(pair, tmp_path_factory):
    """checkpoint-3 and checkpoint-6 of a 6-step heal that was interrupted after its last save."""
    directory = tmp_path_factory.mktemp("interrupted") / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        run_heal(pair, directory.parent / "out", checkpoint_dir=str(directory), callbacks=[StopAfterSave(STEPS)])
    assert sorted(os.listdir(directory)) == ["checkpoint-3", "checkpoint-6"]
    return directory


@pytest.fixture
def copied(checkpoints, tmp_path):
    """A copy of `checkpoints` for a test to resume from or damage."""
    return shutil.copytree(checkpoints, tmp_path / "checkpoints")


def resume(pair, out, checkpoint_dir, **options):
    return run_heal(pair, out, checkpoint_dir=str(checkpoint_dir), resume=True, **options)


def cli_heal(pair, out, checkpoint_dir, *extra):
    """The CLI's heal of `settings()`."""
    return run_cli(
        "heal", pair["student"], out, "--teacher", pair["teacher"], "--data", pair["data"], "--seq-len", SEQ,
        "--batch-size", 2, "--lr", 3e-3, "--max-tokens", STEPS * 2 * SEQ, "--save-steps", 3,
        "--checkpoint-dir", checkpoint_dir, "--quiet", *extra,
    )  # fmt: skip


def cli_resume(pair, out, checkpoint_dir, *extra):
    return cli_heal(pair, out, checkpoint_dir, "--resume", *extra)


@pytest.fixture(scope="module")
def other_student(pair):
    """The student with one weight changed: another model of the same shapes."""
    model = transformers.AutoModelForCausalLM.from_pretrained(pair["student"], dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    path = pair["root"] / "other_student"
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(pair["student"]).save_pretrained(path)
    return path


# ------------------------------------------------------------------- the run a checkpoint is of


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lr=6e-3), r"--lr was 0\.003 in the checkpoint, 0\.006 now"),
        (dict(seq_len=16), r"--seq-len was 32 in the checkpoint, 16 now"),
        (dict(max_tokens=2 * STEPS * 2 * SEQ), r"--max-tokens was 384 in the checkpoint, 768 now"),
        (dict(temperature=2.0), r"--temperature was 1\.0 in the checkpoint, 2\.0 now"),
        (dict(lora_rank=4), r"--lora-rank was unset in the checkpoint, 4 now"),
        ("other student", r"student \(content fingerprint\) was \w{12} in the checkpoint, \w{12} now"),
    ],
    ids=["lr", "seq_len", "max_tokens", "temperature", "lora", "other_student"],
)
def test_resume_refuses_a_checkpoint_of_another_run(pair, copied, tmp_path, other_student, change, message):
    options = {"student": other_student} if change == "other student" else change
    with pytest.raises(HealError, match=message):
        resume(pair, tmp_path / "out", copied, **options)
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(copied)) == ["checkpoint-3", "checkpoint-6"]


def test_resume_of_another_run_is_one_line(pair, copied, tmp_path):
    result = cli_resume(pair, tmp_path / "out", copied, "--lr", 6e-3)
    assert_one_line_error(result, r"checkpoint-6 is a checkpoint of another run \(--lr was 0\.003")


def test_each_checkpoint_records_its_run_and_files(checkpoints):
    record = json.loads((checkpoints / "checkpoint-3" / RUN_RECORD).read_text())
    assert record["run"]["--lr"] == 3e-3 and record["run"]["--seq-len"] == SEQ
    assert len(record["run"]["student (content fingerprint)"]) == 64
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(record["files"])
    assert record["files"]["optimizer.pt"] == (checkpoints / "checkpoint-3" / "optimizer.pt").stat().st_size


# -------------------------------------------------------------------- complete checkpoints only


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "optimizer truncated": (lambda ck: _truncate(ck / "optimizer.pt"), r"optimizer\.pt is \d+ bytes, \d+ when"),
    "no scheduler state": (lambda ck: (ck / "scheduler.pt").unlink(), r"scheduler\.pt is missing"),
    "weights truncated": (lambda ck: _truncate(ck / "model.safetensors"), r"model\.safetensors is \d+ bytes"),
    "no run record": (lambda ck: (ck / RUN_RECORD).unlink(), rf"no {RUN_RECORD}"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_skips_an_incomplete_newest_checkpoint(pair, copied, tmp_path, caplog, damage):
    """A checkpoint a full disk or a kill left incomplete does not block the resume: the newest
    complete one is used, and the warning says which and why; the weights are the whole run's."""
    break_it, reason = DAMAGES[damage]
    break_it(copied / "checkpoint-6")
    run_heal(pair, tmp_path / "whole", save_steps=0)
    with caplog.at_level(logging.WARNING, logger="mergekit_moe2dense.training.trainer"):
        result = resume(pair, tmp_path / "out", copied, logging_steps=2)  # logging is no part of the run
    assert result.record["resumed_from"] == str(copied / "checkpoint-3")
    assert result.steps_from_checkpoint == 3 and result.steps == STEPS
    assert "resuming from" in caplog.text and "checkpoint-3" in caplog.text
    assert "checkpoint-6" in caplog.text and re.search(reason, caplog.text)
    a, b = state_of(tmp_path / "whole"), state_of(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_checkpoint_is_complete_with_its_adapter(pair, tmp_path):
    """Under LoRA the checkpoint holds the adapter, not the model: resumed all the same."""
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        run_heal(pair, tmp_path / "out", lora_rank=4, checkpoint_dir=str(checkpoints), callbacks=[StopAfterSave(3)])
    assert (checkpoints / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not (checkpoints / "checkpoint-3" / "model.safetensors").exists()
    result = resume(pair, tmp_path / "out", checkpoints, lora_rank=4)
    assert result.steps_from_checkpoint == 3 and result.record["lora_alpha"] == 8


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_refuses_when_no_checkpoint_is_complete(pair, copied, tmp_path, damage):
    """Never resumed with a fresh optimiser or scheduler, from half the weights, or from a
    checkpoint of unknown origin: refused in one line naming what is wrong with each."""
    break_it, reason = DAMAGES[damage]
    for name in ("checkpoint-3", "checkpoint-6"):
        break_it(copied / name)
    result = cli_resume(pair, tmp_path / "out", copied)
    assert_one_line_error(result, rf"no complete checkpoint in .*checkpoint-6: .*{reason}")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_does_not_load_is_one_line(pair, copied, tmp_path):
    """Files of the recorded sizes that are not what they were: transformers' error, in one line."""
    for name in ("checkpoint-3", "checkpoint-6"):
        optimizer = copied / name / "optimizer.pt"
        optimizer.write_bytes(b"\0" * optimizer.stat().st_size)
    result = cli_resume(pair, tmp_path / "out", copied)
    assert_one_line_error(result, r"checkpoint-6 does not load into this run \(.+\)")


# ------------------------------------------------------------------------------ a full disk


def test_a_full_disk_while_checkpointing_is_one_line_and_resumable(pair, tmp_path, monkeypatch):
    """The second checkpoint hits a full disk halfway: one line naming it, the space a
    checkpoint needs and the space free; the partial checkpoint is gone, the first resumes."""
    save = transformers.Trainer._save_optimizer_and_scheduler

    def full_disk_at_step_6(self, output_dir):
        if self.state.global_step < STEPS:
            return save(self, output_dir)
        (tmp_path / "checkpoints" / "checkpoint-6" / "optimizer.pt").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full_disk_at_step_6)
    result = cli_heal(pair, tmp_path / "out", tmp_path / "checkpoints")
    assert_one_line_error(
        result,
        r"not enough space for checkpoint \S+checkpoints/checkpoint-6: a checkpoint needs about \d+\.\d\d GB, "
        r"\d+\.\d\d GB is free; .*--checkpoint-dir",
    )
    assert os.listdir(tmp_path / "checkpoints") == ["checkpoint-3"]
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    result = resume(pair, tmp_path / "out", tmp_path / "checkpoints")
    assert result.steps_from_checkpoint == 3


# ------------------------------------------------------------------------- inputs and devices


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_a_truncated_student_or_teacher_is_one_line(pair, tmp_path, which):
    broken = shutil.copytree(pair[which], tmp_path / which)
    _truncate(broken / "model.safetensors")
    models = {"student": pair["student"], "teacher": pair["teacher"], which: broken}
    result = run_cli(
        "heal", models["student"], tmp_path / "out", "--teacher", models["teacher"], "--data", pair["data"],
        "--seq-len", SEQ, "--max-tokens", 64,
    )  # fmt: skip
    assert_one_line_error(result, rf"{which} \S+: shard \S+model\.safetensors is truncated")
    assert not (tmp_path / "out").exists()


def unavailable_device() -> str:
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_heal_and_collapse_refuse_a_device_this_machine_lacks(pair, tmp_path):
    """Not trained on the CPU while recording the device asked for: refused before loading."""
    device = unavailable_device()
    result = run_cli(
        "heal", pair["student"], tmp_path / "out", "--teacher", pair["teacher"], "--data", pair["data"],
        "--seq-len", SEQ, "--max-tokens", 64, "--device", device,
    )  # fmt: skip
    assert_one_line_error(result, rf"--device {device}: ")
    result = run_cli(
        "collapse", pair["teacher"], tmp_path / "out", "--data", pair["data"], "--seq-len", SEQ,
        "--max-tokens", 64, "--device", device,
    )  # fmt: skip
    assert_one_line_error(result, rf"--device {device}: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inside", ["", "checkpoints"])
@pytest.mark.parametrize("option", ["checkpoint_dir", "teacher_cache"])
def test_a_working_directory_in_out_is_refused_up_front(pair, tmp_path, option, inside):
    """Checkpoints or a teacher cache in OUT would make the finished run refuse to publish."""
    out = tmp_path / "out"
    with pytest.raises(HealError, match=r"overlaps OUT"):
        run_heal(pair, out, **{option: str(out / inside)})
    assert not out.exists()


# ------------------------------------------------------------------- leftovers and the record


class FailAtFirstStep(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("the run failed")


def test_a_heal_leaves_no_checkpoint_directory_it_made_in_vain(pair, tmp_path):
    """Failed before any checkpoint, or done with no checkpoint to keep: the directory the run
    made is removed; one the user made is kept."""
    with pytest.raises(RuntimeError, match="the run failed"):
        run_heal(pair, tmp_path / "out", callbacks=[FailAtFirstStep()])
    assert not (tmp_path / "out.checkpoints").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(RuntimeError, match="the run failed"):
        run_heal(pair, tmp_path / "out", checkpoint_dir=str(mine), callbacks=[FailAtFirstStep()])
    assert mine.is_dir()
    run_heal(pair, tmp_path / "kept", max_tokens=2 * SEQ, save_steps=0, keep_checkpoints=True)
    assert not (tmp_path / "kept.checkpoints").exists()


def test_a_resume_reports_the_whole_run_and_the_throughput_of_what_it_trained(pair, copied, tmp_path):
    """Resumed at the last step: no step trained, no throughput; resumed halfway: the run's
    steps and tokens in all, the throughput of the steps trained."""
    result = cli_resume(pair, tmp_path / "out", copied, "--keep-checkpoints")
    assert result.exit_code == 0, result.output
    resumed = f"the first {STEPS} resumed from {copied / 'checkpoint-6'}"
    assert f"({STEPS} steps, {resumed}, {STEPS * 2 * SEQ} tokens, 0 tokens/s" in result.output
    record = json.loads((tmp_path / "out" / "heal.json").read_text())
    assert record["steps"] == STEPS and record["tokens"] == STEPS * 2 * SEQ
    assert record["steps_from_checkpoint"] == STEPS
    assert record["tokens_per_s"] is None and record["mean_loss"] is None and record["train_seconds"] is None
    assert len(record["losses"]) == STEPS  # the run's log, from its checkpoint
    shutil.rmtree(copied / "checkpoint-6")
    result = resume(pair, tmp_path / "halfway", copied)
    record = result.record
    assert (result.steps, result.tokens, result.steps_from_checkpoint) == (STEPS, STEPS * 2 * SEQ, 3)
    assert result.tokens_per_s == pytest.approx(3 * 2 * SEQ / record["train_seconds"])
    card = (tmp_path / "halfway" / "README.md").read_text()
    assert f"{STEPS * 2 * SEQ} tokens" in card and f"({STEPS} steps, the first 3 before resuming" in card


def test_the_record_keeps_absolute_paths_and_the_card_no_local_path(pair, tmp_path, monkeypatch):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(TEXT)
    monkeypatch.chdir(pair["root"])
    result = run_cli(
        "heal", "student", tmp_path / "out", "--teacher", "teacher", "--data", os.path.relpath(pair["data"]),
        "--eval-data", os.path.relpath(held_out), "--seq-len", SEQ, "--max-tokens", 2 * SEQ, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "heal.json").read_text())
    assert record["student"] == str(pair["student"]) and record["teacher"] == str(pair["teacher"])
    assert record["data"] == str(pair["data"]) and record["eval_data"] == str(held_out)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`student`" in card and "`teacher`" in card and "`mixed.txt`" in card and "`held_out.txt`" in card
    assert os.sep + "tmp" not in card and str(pair["root"]) not in card
