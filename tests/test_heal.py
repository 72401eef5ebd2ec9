# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`heal`: the distillation losses, the teacher cache, resume, LoRA, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from helpers import TEXT, StopAfterSave, assert_one_line_error, convert_uniform, make_mixtral, run_cli, state_of
from mergekit_moe2dense.data import load_documents, tokenize_documents
from mergekit_moe2dense.training import HealError, HealSettings, TrainSettings, heal
from mergekit_moe2dense.training.losses import cached_kl, exact_kl, lm_loss, mixed_loss, top_k_targets
from mergekit_moe2dense.training.teacher_cache import (
    TargetSpec,
    TeacherCacheError,
    build_teacher_cache,
    load_teacher_cache,
)

SEQ = 32


# ------------------------------------------------------------------------------------ losses


def test_cached_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_below():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 40) * 3, torch.randn(3, 5, 40) * 3
    for temperature in (1.0, 2.0):
        exact = exact_kl(student, teacher, temperature)
        whole = cached_kl(student, top_k_targets(teacher, 40, temperature), temperature)
        assert torch.allclose(whole, exact, rtol=1e-5, atol=1e-6)
        coarse = [cached_kl(student, top_k_targets(teacher, k, temperature), temperature) for k in (1, 4, 16, 39)]
        assert all(c <= exact + 1e-6 for c in coarse)
        assert coarse == sorted(coarse)  # a finer partition never loses divergence
    same = cached_kl(teacher, top_k_targets(teacher, 4), 1.0)
    assert same.abs() < 1e-5  # zero at the teacher


def test_cached_kl_gradient_matches_exact_with_the_whole_vocabulary():
    torch.manual_seed(1)
    teacher = torch.randn(2, 3, 17)
    grads = []
    for loss in (lambda s: exact_kl(s, teacher, 1.5), lambda s: cached_kl(s, top_k_targets(teacher, 17, 1.5), 1.5)):
        student = torch.randn(2, 3, 17, generator=torch.Generator().manual_seed(2)).requires_grad_()
        loss(student).backward()
        grads.append(student.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_mixed_loss_weights_its_parts():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    total, parts = mixed_loss(student, ids, teacher=teacher, temperature=1.0, lm_weight=0.25)
    assert torch.allclose(total, 0.75 * exact_kl(student, teacher) + 0.25 * lm_loss(student, ids))
    assert set(parts) == {"kd", "lm"}
    only_lm, parts = mixed_loss(student, ids, teacher=None, temperature=1.0, lm_weight=1.0)
    assert set(parts) == {"lm"} and torch.allclose(only_lm, lm_loss(student, ids))


def test_lm_loss_is_the_mean_next_token_cross_entropy():
    """Against a hand computation: -log softmax(s_t)[id_{t+1}], averaged over the B x (T-1) pairs."""
    torch.manual_seed(4)
    student, ids = torch.randn(3, 7, 13), torch.randint(0, 13, (3, 7))
    log_q = student.log_softmax(-1)
    expected = -torch.stack([log_q[b, t, ids[b, t + 1]] for b in range(3) for t in range(6)]).mean()
    torch.testing.assert_close(lm_loss(student, ids), expected)


def test_the_losses_at_a_temperature_scale_the_logits():
    torch.manual_seed(5)
    student, teacher = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    targets = top_k_targets(teacher, 9, temperature=2.0)
    torch.testing.assert_close(cached_kl(student, targets, 2.0), exact_kl(student, teacher, 2.0))
    torch.testing.assert_close(exact_kl(student, teacher, 2.0), 4 * exact_kl(student / 2, teacher / 2, 1.0))


# ---------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_dir, calib_dir):
    """A tiny random Mixtral teacher, its uniform dense conversion as the student, and
    training / held-out text."""
    root = tmp_path_factory.mktemp("heal")
    teacher = make_mixtral(root / "teacher", tokenizer_dir, seed=3)
    student = convert_uniform(teacher, root / "student", calib_dir)
    held_out = root / "held_out.txt"
    lines = TEXT.splitlines()
    held_out.write_text("\n".join(lines[::-1]))
    return {"teacher": teacher, "student": student, "data": calib_dir / "mixed.txt", "held_out": held_out}


def settings(**overrides) -> TrainSettings:
    values = dict(max_tokens=6 * 2 * SEQ, seq_len=SEQ, batch_size=2, lr=3e-3, logging_steps=1)
    values.update(overrides)
    return TrainSettings(**values)


def held_out_kl(student, teacher, held_out, tokenizer_dir) -> float:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [t for _, doc in tokenize_documents(load_documents(held_out), tokenizer) for t in doc]
    batch = torch.tensor(ids[: 4 * SEQ]).view(4, SEQ)
    models = [
        transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (student, teacher)
    ]
    with torch.no_grad():
        s, t = (m(input_ids=batch).logits for m in models)
    return exact_kl(s, t).item()


# ------------------------------------------------------------------------------------- heal


@pytest.mark.slow
def test_heal_lowers_held_out_kl_and_records_the_run(pair, tmp_path, tokenizer_dir):
    out = tmp_path / "healed"
    result = run_cli(
        "heal", pair["student"], out, "--teacher", pair["teacher"], "--data", pair["data"],
        "--max-tokens", 12 * 2 * SEQ, "--seq-len", SEQ, "--batch-size", 2, "--lr", 3e-3,
        "--eval-data", pair["held_out"], "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output
    before = held_out_kl(pair["student"], pair["teacher"], pair["held_out"], tokenizer_dir)
    after = held_out_kl(out, pair["teacher"], pair["held_out"], tokenizer_dir)
    assert after < 0.8 * before, (before, after)
    record = json.loads((out / "heal.json").read_text())
    assert record["steps"] == 12 and record["tokens"] == 12 * 2 * SEQ
    assert record["perplexity_after"] < record["perplexity_before"]
    card = (out / "README.md").read_text()
    assert f"`{pair['teacher'].name}`" in card and "forward KL" in card and str(12 * 2 * SEQ) in card
    assert str(pair["teacher"]) not in card  # a published card names no local path
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "MistralForCausalLM"
    assert not (tmp_path / "healed.checkpoints").exists()


@pytest.mark.slow
def test_teacher_cache_gives_the_on_the_fly_loss(pair, tmp_path):
    """With every logit kept, training from the layer-streamed cache is the on-the-fly run."""
    vocab = transformers.AutoConfig.from_pretrained(pair["teacher"]).vocab_size
    common = dict(student=str(pair["student"]), teacher=str(pair["teacher"]), data=str(pair["data"]))
    live = heal(
        HealSettings(training=settings(max_tokens=3 * 2 * SEQ), **common), str(tmp_path / "live"), progress=False
    )
    cache = tmp_path / "cache"
    cached = heal(
        HealSettings(training=settings(max_tokens=3 * 2 * SEQ), teacher_cache=str(cache), teacher_top_k=vocab, **common),
        str(tmp_path / "cached"), progress=False,
    )  # fmt: skip
    assert len(live.record["losses"]) == 3
    assert cached.record["losses"] == pytest.approx(live.record["losses"], rel=1e-4)
    assert cached.final_loss == pytest.approx(live.final_loss, rel=1e-4)
    a, b = state_of(tmp_path / "live"), state_of(tmp_path / "cached")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert json.loads((cache / "cache.json").read_text())["complete"]


def test_teacher_cache_stores_the_full_forward_top_k(pair, tmp_path, tokenizer_dir):
    """The layer-streamed pass (one decoder layer at a time, then norm and head) stores the
    top-k of the whole model's logits; a second call reuses it; other settings are refused."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [t for _, doc in tokenize_documents(load_documents(pair["data"]), tokenizer) for t in doc]
    sequences = torch.tensor(ids[: 5 * SEQ]).view(5, SEQ)
    cache = str(tmp_path / "cache")
    spec = TargetSpec(top_k=7, temperature=2.0, dtype=torch.float32)
    assert build_teacher_cache(
        cache, str(pair["teacher"]), sequences, spec, batch_size=2, chunk_sequences=3, progress=False
    )
    assert not build_teacher_cache(cache, str(pair["teacher"]), sequences, spec, progress=False)
    targets = load_teacher_cache(cache, str(pair["teacher"]), sequences, spec)
    model = transformers.AutoModelForCausalLM.from_pretrained(pair["teacher"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = top_k_targets(model(input_ids=sequences).logits, 7, 2.0)
    assert torch.equal(targets.indices, expected.indices)
    assert torch.allclose(targets.logits, expected.logits, atol=1e-4)
    assert torch.allclose(targets.rest_lse, expected.rest_lse, atol=1e-4)
    with pytest.raises(TeacherCacheError, match="temperature"):
        load_teacher_cache(
            cache, str(pair["teacher"]), sequences, TargetSpec(top_k=7, temperature=1.0, dtype=torch.float32)
        )
    with pytest.raises(TeacherCacheError, match="tokens_sha256"):
        build_teacher_cache(cache, str(pair["teacher"]), sequences[:4], spec, progress=False)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_weights(pair, tmp_path):
    common = dict(student=str(pair["student"]), teacher=str(pair["teacher"]), data=str(pair["data"]))
    heal(HealSettings(training=settings(), **common), str(tmp_path / "whole"), progress=False)
    checkpoints = str(tmp_path / "checkpoints")
    with pytest.raises(KeyboardInterrupt):
        heal(
            HealSettings(training=settings(save_steps=3), checkpoint_dir=checkpoints, **common),
            str(tmp_path / "resumed"), callbacks=[StopAfterSave(3)], progress=False,
        )  # fmt: skip
    assert not (tmp_path / "resumed").exists()
    result = heal(
        HealSettings(training=settings(save_steps=3), checkpoint_dir=checkpoints, resume=True, **common),
        str(tmp_path / "resumed"), progress=False,
    )  # fmt: skip
    assert result.record["resumed_from"].endswith("checkpoint-3")
    a, b = state_of(tmp_path / "whole"), state_of(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(a[k].equal(state_of(pair["student"])[k]) for k in a if "layers.0.mlp" in k)


@pytest.mark.slow
def test_lora_heal_writes_a_plain_model(pair, tmp_path, monkeypatch):
    out = tmp_path / "lora"
    heal(
        HealSettings(student=str(pair["student"]), teacher=str(pair["teacher"]), data=str(pair["data"]),
                     training=settings(max_tokens=3 * 2 * SEQ, lr=1e-2), lora_rank=4),
        str(out), progress=False,
    )  # fmt: skip
    assert not list(out.glob("adapter_*"))
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # loads without peft
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MistralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    student = state_of(pair["student"])
    healed = {k: v for k, v in model.state_dict().items()}
    assert healed.keys() == student.keys()
    changed = [k for k in student if not torch.equal(student[k], healed[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # LoRA's targets, merged


# ------------------------------------------------------------------------------------ errors


def heal_args(pair, out, *extra):
    return (
        "heal",
        pair["student"],
        out,
        "--teacher",
        pair["teacher"],
        "--data",
        pair["data"],
        "--seq-len",
        SEQ,
        *extra,
    )


def test_heal_refuses_an_moe_student(pair, tmp_path):
    result = run_cli(
        "heal",
        pair["teacher"],
        tmp_path / "o",
        "--teacher",
        pair["teacher"],
        "--data",
        pair["data"],
        "--max-tokens",
        64,
    )
    assert_one_line_error(result, "is a Mixture-of-Experts model")


def test_heal_refuses_a_model_that_is_not_a_causal_lm(pair, tmp_path):
    config = transformers.BertConfig(
        vocab_size=304, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    result = run_cli(
        "heal", tmp_path / "bert", tmp_path / "o", "--teacher", pair["teacher"], "--data", pair["data"], "--max-tokens", 64,
    )  # fmt: skip
    assert_one_line_error(result, "not a causal language model")


def test_heal_refuses_other_vocabularies(pair, tmp_path, tokenizer_dir):
    other = tmp_path / "other"  # refused from config.json alone: no weights needed
    config = transformers.AutoConfig.from_pretrained(pair["teacher"])
    config.vocab_size = 400
    config.save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(other)
    result = run_cli(
        "heal", pair["student"], tmp_path / "o", "--teacher", other, "--data", pair["data"], "--max-tokens", 64
    )
    assert_one_line_error(result, "same tokenizer and vocabulary")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "retok")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "retok" / name).write_bytes((pair["teacher"] / name).read_bytes())
    result = run_cli(
        "heal",
        pair["student"],
        tmp_path / "o",
        "--teacher",
        tmp_path / "retok",
        "--data",
        pair["data"],
        "--max-tokens",
        64,
    )
    assert_one_line_error(result, "different tokenizers")


def test_heal_refuses_zero_tokens_and_short_data(pair, tmp_path):
    assert_one_line_error(
        run_cli(*heal_args(pair, tmp_path / "o", "--max-tokens", 0)), "--max-tokens must be at least 1"
    )
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass")
    result = run_cli(
        "heal",
        pair["student"],
        tmp_path / "o",
        "--teacher",
        pair["teacher"],
        "--data",
        short,
        "--seq-len",
        SEQ,
        "--max-tokens",
        64,
    )
    assert_one_line_error(result, "fewer than one sequence of --seq-len 32")
    assert not (tmp_path / "o").exists()


def test_heal_refuses_an_out_inside_an_input_and_resume_without_checkpoint(pair, tmp_path):
    assert_one_line_error(run_cli(*heal_args(pair, pair["teacher"] / "o", "--max-tokens", 64)), "is inside the teacher")
    assert_one_line_error(run_cli(*heal_args(pair, tmp_path / "o", "--max-tokens", 64, "--resume")), "no checkpoint")
    with pytest.raises(HealError, match="overlaps the student"):
        heal(HealSettings(student=str(pair["student"]), teacher=str(pair["teacher"]), data=str(pair["data"]),
                          training=settings(), teacher_cache=str(pair["student"] / "cache")), str(tmp_path / "o"))  # fmt: skip
