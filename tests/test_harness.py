# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`eval --tasks`: lm-evaluation-harness on several models side by side, with a local task."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
import transformers
from mergekit.options import MergeOptions

from helpers import assert_one_line_error, make_config, run_cli
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.harness import HarnessError, TaskResult, _scores, format_task_table, parse_tasks

pytest.importorskip("lm_eval")  # the [eval] extra; scripts/setup.sh installs it

DOCS = [
    {"question": f"the {word} merges", "choices": ["experts", "router", "dense model"], "answer": i % 3}
    for i, word in enumerate(["model", "layer", "config", "tensor", "token", "expert", "graph", "plan", "shard"])
]


def write_task(directory, docs=DOCS, name="tiny_choice", dataset=None):
    """A multiple-choice task over a jsonl made here: nothing comes from a hub (unless `dataset`
    names a hub dataset to read instead)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    source = (
        f"dataset_path: {dataset}"
        if dataset
        else f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}"
    )
    (directory / f"{name}.yaml").write_text(
        f"""task: {name}
{source}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
    )
    return directory


def accuracy_by_hand(model_dir, docs=DOCS) -> float:
    """Multiple choice as lm-eval defines it: the choice (after a space) with the highest summed
    log-likelihood given the question, the context and continuation split of the whole string."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for doc in docs:
        context = tokenizer(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
            continuation = whole[len(context) :]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            targets = torch.tensor(continuation)
            scores.append(logprobs[len(context) - 1 :].gather(-1, targets[:, None]).sum().item())
        correct += max(range(len(scores)), key=lambda i: (scores[i], -i)) == doc["answer"]
    return correct / len(docs)


# --- parsing and reporting (no model) -------------------------------------------------


def test_a_directory_stands_for_its_tasks(tmp_path):
    write_task(tmp_path / "tasks")
    write_task(tmp_path / "tasks", name="second_choice")
    spec = parse_tasks(f"{tmp_path / 'tasks'}")
    assert spec.names == ("second_choice", "tiny_choice")
    assert spec.include_paths == (str(tmp_path / "tasks"),) and spec.include_defaults is False


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "no task given"),
        ("./nowhere", r"\./nowhere: no such directory"),
        ("EMPTY", "defines no lm-eval task"),
    ],
)
def test_bad_task_specs(tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match=message):
        parse_tasks(spec.replace("EMPTY", str(tmp_path / "empty")))


def test_without_lm_eval_the_message_says_what_to_install(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name.startswith("lm_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(HarnessError, match=r"pip install 'mergekit-moe2dense\[eval\]'"):
        parse_tasks(str(write_task(tmp_path / "tasks")))


def test_lm_eval_results_become_metrics_with_stderr():
    results = {
        "arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25},
        "gsm8k": {"exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": "N/A"},
    }
    assert _scores(results) == {
        "arc_easy": {"acc": {"value": 0.5, "stderr": 0.1}, "acc_norm": {"value": 0.25, "stderr": None}},
        "gsm8k": {"exact_match (strict-match)": {"value": 0.2, "stderr": None}},
    }


def test_task_table_has_every_model_and_the_deltas():
    results = [
        TaskResult("moe", {"t": {"acc": {"value": 0.5, "stderr": 0.05}, "acc_norm": {"value": 0.4, "stderr": None}}}),
        TaskResult("dense", {"t": {"acc": {"value": 0.45, "stderr": 0.05}}}),
    ]
    lines = format_task_table(results).splitlines()
    assert lines[0].split() == ["task", "metric", "moe", "dense", "delta", "dense"]
    assert lines[1].split() == ["t", "acc", "0.5000", "±", "0.0500", "0.4500", "±", "0.0500", "-0.0500"]
    assert lines[2].split() == ["t", "acc_norm", "0.4000", "-", "-"]
    assert len({len(line) for line in lines}) == 1
    assert format_task_table(results, reference="dense").splitlines()[1].split()[-1] == "+0.0500"
    with pytest.raises(HarnessError, match="reference 'x'"):
        format_task_table(results, reference="x")


def test_eval_needs_data_or_tasks(random_moe):
    assert_one_line_error(run_cli("eval", random_moe["legacy"]), "needs --data .*--tasks")


def test_unknown_task_is_refused_before_any_model_loads(random_moe, tmp_path, monkeypatch):
    import mergekit_moe2dense.harness as harness

    monkeypatch.setattr(harness, "evaluate_tasks", lambda *a, **k: pytest.fail("a model was evaluated"))
    tasks = write_task(tmp_path / "tasks")
    indexed = []

    def manager(paths, defaults):  # lm-eval's full index takes seconds to read: a stand-in with our task
        indexed.append((paths, defaults))
        return type("Index", (), {"all_tasks": ["tiny_choice"]})()

    monkeypatch.setattr(harness, "_task_manager", manager)
    result = run_cli("eval", random_moe["legacy"], "--tasks", f"{tasks},no_such_task")
    assert_one_line_error(result, "unknown lm-eval task no_such_task")
    assert indexed[-1] == ((str(tasks),), True)  # the names need lm-eval's own index


# --- end to end -------------------------------------------------------------------------


@pytest.mark.slow  # lm-eval runs two models (about a minute on 2 cores)
def test_eval_tasks_side_by_side_match_a_hand_computation(random_moe, calib_dir, tmp_path):
    moe = random_moe["legacy"]
    dense = tmp_path / "dense"
    build_dense(make_config(moe, "router_weighted", calib_dir), str(dense), MergeOptions(quiet=True))
    tasks = write_task(tmp_path / "tasks")
    out = tmp_path / "scores.json"
    result = run_cli("eval", moe, dense, "--tasks", tasks, "--batch-size", 2, "--json", out)
    assert result.exit_code == 0, result.output
    expected = [accuracy_by_hand(moe), accuracy_by_hand(dense)]
    payload = json.loads(out.read_text())
    assert [entry["model"] for entry in payload] == [str(moe), str(dense)]
    measured = [entry["tasks"]["tiny_choice"]["acc"]["value"] for entry in payload]
    assert measured == pytest.approx(expected, abs=1e-9)
    row = next(line for line in result.output.splitlines() if line.startswith("tiny_choice"))
    assert row.split()[-1] == f"{expected[1] - expected[0]:+.4f}"
    assert f"{expected[0]:.4f}" in row and f"{expected[1]:.4f}" in row


def fail_if_called(*args, **kwargs):
    pytest.fail("a model was evaluated")


def test_task_data_that_cannot_be_downloaded_is_refused_before_any_model_loads(random_moe, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    import mergekit_moe2dense.harness as harness

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # no network here: fail at once, not after retries
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # both read the variable on import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(harness, "evaluate_tasks", fail_if_called)
    tasks = write_task(tmp_path / "tasks", name="remote_choice", dataset="moe2dense-tests/not-downloaded")
    result = run_cli("eval", random_moe["legacy"], "--tasks", tasks)
    assert_one_line_error(
        result, r"--tasks remote_choice: the task's data cannot be loaded \(.*not-downloaded.*must be available locally"
    )


def test_a_base_model_is_refused_before_lm_eval_runs(tokenizer_dir, tmp_path, monkeypatch):
    import lm_eval

    base = tmp_path / "base"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    transformers.MistralModel(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fail_if_called)
    result = run_cli("eval", base, "--tasks", write_task(tmp_path / "tasks"))
    assert_one_line_error(result, "is a MistralModel checkpoint: a base model without an LM head")
