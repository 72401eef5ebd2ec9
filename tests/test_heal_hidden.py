# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`heal --hidden-weight`: the hidden-state loss, its place in the trainer's loss, the settings
and models it refuses, and its record in `heal.json` and in each checkpoint's run."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from helpers import assert_one_line_error, convert_uniform, make_mixtral, run_cli, state_of
from mergekit_moe2dense.training import HealError, HealSettings, TrainSettings, heal
from mergekit_moe2dense.training.losses import hidden_loss, mixed_loss
from mergekit_moe2dense.training.trainer import RUN_RECORD, DistillTrainer

SEQ = 32


# ------------------------------------------------------------------------------------- the loss


def layers(seed: int, scales=(1.0, 10.0, 100.0)) -> list[torch.Tensor]:
    """Hidden states of three layers whose scales grow with depth, as a residual stream's do."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 8, generator=generator) * scale for scale in scales]


def test_hidden_loss_is_zero_at_the_teacher_and_positive_elsewhere():
    teacher = layers(0)
    assert torch.equal(hidden_loss([t.clone() for t in teacher], teacher), torch.tensor(0.0))
    student = [t.clone() for t in teacher]
    student[1][0, 0, 0] += 1e-3
    assert hidden_loss(student, teacher) > 0


def test_hidden_loss_is_the_mean_of_each_layers_relative_error():
    teacher, student = layers(0), layers(1)
    expected = torch.stack([((s - t) ** 2).sum() / (t**2).sum() for s, t in zip(student, teacher)]).mean()
    torch.testing.assert_close(hidden_loss(student, teacher), expected)
    # layers weigh alike: the same relative error costs the same at any scale of the stream
    noise = layers(2, scales=(1.0, 1.0, 1.0))
    once = hidden_loss([t + 0.1 * n * t.std() for t, n in zip(teacher, noise)], teacher)
    flat = [t / t.std() for t in teacher]
    torch.testing.assert_close(once, hidden_loss([t + 0.1 * n for t, n in zip(flat, noise)], flat))
    torch.testing.assert_close(hidden_loss([3 * s for s in student], [3 * t for t in teacher]), expected)


def test_hidden_loss_trains_the_student_only_and_refuses_other_shapes():
    teacher = [t.requires_grad_() for t in layers(0)]
    student = [s.requires_grad_() for s in layers(1)]
    hidden_loss(student, teacher).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)  # the targets are constants
    with pytest.raises(ValueError, match="2 student hidden states, 3 of the teacher"):
        hidden_loss(student[:2], teacher)
    with pytest.raises(ValueError, match=r"\(2, 5, 4\)"):
        hidden_loss([s[..., :4] for s in student], teacher)


# ---------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir, calib_dir):
    """A tiny random Mixtral teacher, its uniform dense conversion as the student, training text."""
    root = tmp_path_factory.mktemp("heal_hidden")
    teacher = make_mixtral(root / "teacher", tokenizer_dir, seed=3)
    student = convert_uniform(teacher, root / "student", calib_dir)
    return {"root": root, "teacher": teacher, "student": student, "data": calib_dir / "mixed.txt"}


def loaded(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def trainer_loss(pair, tmp_path, ids, *, hidden_weight: float, lm_weight: float = 0.0):
    """`DistillTrainer.compute_loss` on `ids`, and the parts it logs."""
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    student = loaded(pair["student"])
    trainer = DistillTrainer(
        model=student, args=args, teacher=loaded(pair["teacher"]), lm_weight=lm_weight, hidden_weight=hidden_weight
    )
    loss = trainer.compute_loss(student, {"input_ids": ids})
    return loss, {name: values[-1] for name, values in trainer._parts.items()}


def test_the_trainer_adds_the_weighted_hidden_loss_and_nothing_at_weight_0(pair, tmp_path):
    ids = torch.randint(0, transformers.AutoConfig.from_pretrained(pair["student"]).vocab_size, (2, SEQ))
    student, teacher = loaded(pair["student"]).eval(), loaded(pair["teacher"]).eval()
    with torch.no_grad():
        s, t = (m(input_ids=ids, use_cache=False, output_hidden_states=True) for m in (student, teacher))
    kd, _ = mixed_loss(s.logits, ids, teacher=t.logits, temperature=1.0, lm_weight=0.0)
    hidden = hidden_loss(s.hidden_states[1:], t.hidden_states[1:])
    assert len(s.hidden_states) == transformers.AutoConfig.from_pretrained(pair["student"]).num_hidden_layers + 1
    assert hidden > 0  # the student's MLPs are not the teacher's

    with torch.no_grad():
        plain, parts = trainer_loss(pair, tmp_path, ids, hidden_weight=0.0)
    assert torch.equal(plain, kd) and set(parts) == {"kd"}  # bit for bit the loss without the option
    with torch.no_grad():
        mixed, parts = trainer_loss(pair, tmp_path, ids, hidden_weight=0.5)
    assert set(parts) == {"kd", "hidden"} and torch.equal(parts["kd"], kd)
    torch.testing.assert_close(parts["hidden"], hidden)
    torch.testing.assert_close(mixed, kd + 0.5 * hidden)
    with torch.no_grad():  # LM loss only: the teacher still runs, for its hidden states
        lm_only, parts = trainer_loss(pair, tmp_path, ids, hidden_weight=2.0, lm_weight=1.0)
    assert set(parts) == {"lm", "hidden"}
    torch.testing.assert_close(lm_only, parts["lm"] + 2.0 * hidden)


# ----------------------------------------------------------------------------------- refusals


def heal_args(pair, out, *extra):
    return (
        "heal", pair["student"], out, "--teacher", pair["teacher"], "--data", pair["data"], "--seq-len", SEQ,
        "--batch-size", 2, "--lr", 3e-3, "--max-tokens", 3 * 2 * SEQ, "--quiet", *extra,
    )  # fmt: skip


def test_hidden_weight_with_a_teacher_cache_is_refused_before_anything_runs(pair, tmp_path):
    common = dict(student=str(pair["student"]), teacher=str(pair["teacher"]), data=str(pair["data"]))
    training = TrainSettings(max_tokens=64, seq_len=SEQ)
    with pytest.raises(HealError, match="--hidden-weight .* --teacher-cache stores only its logits"):
        HealSettings(training=training, hidden_weight=0.1, teacher_cache=str(tmp_path / "cache"), **common)
    HealSettings(training=training, hidden_weight=0.0, teacher_cache=str(tmp_path / "cache"), **common)
    with pytest.raises(HealError, match="--hidden-weight must be 0 .* or more, got -0.1"):
        HealSettings(training=training, hidden_weight=-0.1, **common)
    result = run_cli(*heal_args(pair, tmp_path / "o", "--hidden-weight", 1, "--teacher-cache", tmp_path / "cache"))
    assert_one_line_error(result, "--hidden-weight needs the teacher's hidden states")
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_hidden_layers=3), "has 2 decoder layers of hidden size 32, teacher .* 3 of 32"),
        (dict(hidden_size=48), "has 2 decoder layers of hidden size 32, teacher .* 2 of 48"),
    ],
    ids=["layers", "hidden_size"],
)
def test_a_teacher_of_other_layers_is_refused_with_hidden_weight(pair, tmp_path, tokenizer_dir, change, message):
    other = tmp_path / "other"  # refused from config.json alone, before any weight is read
    config = transformers.AutoConfig.from_pretrained(pair["teacher"])
    for key, value in change.items():
        setattr(config, key, value)
    config.save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(other)
    args = list(heal_args(pair, tmp_path / "o", "--hidden-weight", 1))
    args[args.index("--teacher") + 1] = other
    assert transformers.AutoConfig.from_pretrained(pair["student"]).hidden_size == 32
    assert_one_line_error(run_cli(*args), f"--hidden-weight: student .*{message}; the hidden-state loss needs")
    # logit KD alone takes such a teacher: the next check (its weights) is what refuses this one
    without = run_cli(*args[:-2])
    assert_one_line_error(without, "teacher .*other")
    assert "hidden-state loss" not in without.output


# ------------------------------------------------------------------------------ end to end


def test_a_heal_with_hidden_weight_trains_otherwise_and_records_it(pair, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    result = run_cli(
        *heal_args(pair, tmp_path / "hidden", "--hidden-weight", 1, "--save-steps", 3, "--keep-checkpoints",
                   "--checkpoint-dir", checkpoints)
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "hidden" / "heal.json").read_text())
    assert record["hidden_weight"] == 1.0 and record["steps"] == 3
    run = json.loads((checkpoints / "checkpoint-3" / RUN_RECORD).read_text())["run"]
    assert run["--hidden-weight"] == 1.0

    plain = run_cli(*heal_args(pair, tmp_path / "plain"))
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "plain" / "heal.json").read_text())["hidden_weight"] == 0.0
    assert "1.0 x the per-layer hidden-state loss" in (tmp_path / "hidden" / "README.md").read_text()
    assert "hidden-state" not in (tmp_path / "plain" / "README.md").read_text()
    assert record["losses"][0] > json.loads((tmp_path / "plain" / "heal.json").read_text())["losses"][0]
    a, b = state_of(tmp_path / "hidden"), state_of(tmp_path / "plain")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the option changes the training

    for other, was in (("0.5", "0.5 now"), (None, "unset now")):
        extra = ("--hidden-weight", other) if other else ()
        resumed = run_cli(
            *heal_args(pair, tmp_path / "resumed", *extra, "--save-steps", 3, "--checkpoint-dir", checkpoints, "--resume")
        )  # fmt: skip
        assert_one_line_error(resumed, rf"another run \(--hidden-weight was 1\.0 in the checkpoint, {was}")


def test_the_hidden_loss_is_logged_and_falls_in_training(pair, tmp_path):
    class Logs(transformers.TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.seen.append(dict(logs))

    logs = Logs()
    heal(
        HealSettings(student=str(pair["student"]), teacher=str(pair["teacher"]), data=str(pair["data"]),
                     training=TrainSettings(max_tokens=8 * 2 * SEQ, seq_len=SEQ, batch_size=2, lr=3e-3,
                                            logging_steps=1, lm_weight=1.0), hidden_weight=1.0),
        str(tmp_path / "out"), callbacks=[logs], progress=False,
    )  # fmt: skip
    hidden = [entry["hidden"] for entry in logs.seen]
    assert len(hidden) == 8 and "lm" in logs.seen[0] and "kd" not in logs.seen[0]
    assert hidden[-1] < hidden[0]
