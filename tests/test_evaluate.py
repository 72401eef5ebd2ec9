# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
import json
import json.decoder
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    PreTrainedTokenizerFast,
)

import mergekit_moe2dense.perplexity as evaluate_module
from helpers import assert_one_line_error, run_cli
from mergekit_moe2dense.data import Document
from mergekit_moe2dense.perplexity import (
    EvalResult,
    Window,
    evaluate_models,
    evaluate_perplexity,
    format_results_table,
    load_eval_documents,
    plan_windows,
    token_streams,
    write_results_json,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b):\n    return a + b",
    "merging experts into one dense model keeps the router's knowledge",
    "perplexity is the exponential of the mean negative log likelihood",
]


@pytest.fixture(scope="session")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_model(seed: int, vocab_size: int) -> MistralForCausalLM:
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MistralForCausalLM(config).eval()


@pytest.fixture(scope="session")
def model(tokenizer):
    return make_model(0, len(tokenizer))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """Two saved models with tokenizers, and one saved without."""
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed, name, with_tokenizer in [(0, "a", True), (1, "b", True), (0, "bare", False)]:
        path = root / name
        make_model(seed, len(tokenizer)).save_pretrained(path)
        if with_tokenizer:
            tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths


def docs(*items):
    return [Document(source, text) for source, text in items]


def long_docs(repeats=3):
    return docs(*[("long", text) for text in CORPUS * repeats])


def stream_of(documents, tokenizer):
    (stream,) = token_streams(documents, tokenizer).values()
    return stream


def run(model, documents, tokenizer, **kwargs):
    return evaluate_perplexity(model, documents, tokenizer=tokenizer, progress=False, **kwargs)


def window_nll_by_hand(model, stream, start, end, score_from):
    """Summed NLL and count of the scorable tokens of stream[score_from:end] given
    stream[start:...], via transformers' labels loss."""
    ids = torch.tensor([stream.ids[start:end]])
    labels = ids.clone()
    labels[0, : score_from - start] = -100
    labels[0, [i - start for i in range(start, end) if not stream.scorable[i]]] = -100
    count = int((labels[0, 1:] != -100).sum())
    if count == 0:
        return 0.0, 0
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return loss.double().item() * count, count


# --- window plan ---------------------------------------------------------------


@pytest.mark.parametrize(
    "n, seq_len, stride",
    [
        (2, 8, None),
        (5, 8, None),
        (8, 8, None),
        (9, 8, None),  # n == seq_len + 1: the last window holds one token and scores none
        (10, 8, None),
        (9, 8, 8),
        (100, 8, None),
        (100, 8, 7),
        (100, 8, 4),
        (100, 8, 1),
        (101, 16, 5),
        (16, 16, 3),
        (3, 2, None),
        (50, 2, 1),
    ],
)
def test_windows_score_each_token_at_most_once(n, seq_len, stride):
    windows = plan_windows(n, seq_len, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    if stride is None or stride == seq_len:  # non-overlapping: every window's first token is context only
        assert scored == [t for t in range(1, n) if t % seq_len]
    else:  # sliding: every token after the first, once
        assert scored == list(range(1, n))
    step = seq_len if stride is None else stride
    for i, w in enumerate(windows):
        assert w.start == i * step and w.end == min(w.start + seq_len, n)
        assert w.start < w.score_from < w.end


def test_default_windows_do_not_overlap():
    assert plan_windows(20, 8) == [Window(0, 8, 1), Window(8, 16, 9), Window(16, 20, 17)]
    assert plan_windows(20, 8, 4) == [Window(0, 8, 1), Window(4, 12, 8), Window(8, 16, 12), Window(12, 20, 16)]


@pytest.mark.parametrize("n", [0, 1])
def test_stream_too_short_has_no_windows(n):
    assert plan_windows(n, 8) == []


@pytest.mark.parametrize("seq_len, stride", [(1, None), (8, 0), (8, 9)])
def test_invalid_window_parameters(seq_len, stride):
    with pytest.raises(ValueError):
        plan_windows(10, seq_len, stride)


def test_window_parameters_are_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="stride"):
        evaluate_perplexity(str(tmp_path / "never-loaded"), long_docs(1), seq_len=8, stride=9)


# --- perplexity against references -----------------------------------------------


def guide_perplexity(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """transformers' perplexity guide ("Perplexity of fixed-length models"), as written
    there, except that the scored tokens are counted rather than derived."""
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on the last loop
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())  # the model shifts the labels
        if num_loss_tokens:
            with torch.no_grad():
                neg_log_likelihood = model(input_ids, labels=target_ids).loss
            nll_sum += neg_log_likelihood.double().item() * num_loss_tokens
            n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.fixture(scope="session")
def real_file(tmp_path_factory):
    """A real text file: the source of the standard library's json decoder."""
    path = tmp_path_factory.mktemp("real") / "decoder.txt"
    path.write_bytes(Path(json.decoder.__file__).read_bytes())
    return path


@pytest.mark.parametrize("seq_len, stride", [(64, None), (64, 16), (48, 47)])
def test_txt_file_matches_the_transformers_guide(model, tokenizer, real_file, seq_len, stride):
    """A .txt file is BOS + the whole file as one stream, scored as transformers' guide does."""
    text = open(real_file, encoding="utf-8").read()
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(ids) > 10 * seq_len
    expected, count = guide_perplexity(model, ids, seq_len, stride or seq_len)

    documents = load_eval_documents(real_file)
    assert documents == [Document("decoder", text)]
    result = run(model, documents, tokenizer, seq_len=seq_len, stride=stride, batch_size=3)
    assert result.tokens == count
    assert result.perplexity == pytest.approx(expected, rel=1e-6)


def test_documents_keep_their_boundaries_and_bos_is_never_scored(model, tokenizer):
    documents = docs(("s", CORPUS[0]), ("s", CORPUS[1]))
    first, second = (tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in documents)
    bos = tokenizer.bos_token_id
    ids = torch.tensor([[bos, *first, bos, *second]])
    targets = ids[0, 1:].clone()
    targets[len(first)] = -100  # the second BOS
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    expected = math.exp(F.cross_entropy(logits[:-1].double(), targets, ignore_index=-100).item())

    result = run(model, documents, tokenizer, seq_len=ids.shape[1] + 10)
    assert result.tokens == len(first) + len(second)
    assert result.perplexity == pytest.approx(expected, rel=1e-6)
    assert result.per_source["s"] == {"perplexity": result.perplexity, "tokens": result.tokens}


@pytest.mark.parametrize("stride", [None, 5, 16, 31])
def test_windows_over_documents_match_per_window_loss(model, tokenizer, stride):
    documents = long_docs()
    stream = stream_of(documents, tokenizer)
    windows = plan_windows(len(stream.ids), 32, stride)
    assert len(windows) > 3
    nll, count = map(sum, zip(*(window_nll_by_hand(model, stream, *w) for w in windows)))

    result = run(model, documents, tokenizer, seq_len=32, stride=stride, batch_size=4)
    assert result.tokens == count == sum(stream.scorable[w.score_from : w.end].count(True) for w in windows)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


# --- sources, batching, options -----------------------------------------------------


def mixed_docs():
    return long_docs(2) + docs(("code", CORPUS[1]), ("short", "a b"), ("code", CORPUS[1]))


def test_per_source_breakdown_combines_to_overall(model, tokenizer):
    documents = mixed_docs()
    result = run(model, documents, tokenizer, seq_len=24)
    assert set(result.per_source) == {"long", "code", "short"}
    per_source = result.per_source.values()
    assert result.tokens == sum(s["tokens"] for s in per_source)
    total_nll = sum(math.log(s["perplexity"]) * s["tokens"] for s in per_source)
    assert math.log(result.perplexity) * result.tokens == pytest.approx(total_nll, rel=1e-9)
    # a source's numbers do not depend on the other sources
    alone = run(model, [d for d in documents if d.source == "code"], tokenizer, seq_len=24)
    assert alone.per_source["code"]["tokens"] == result.per_source["code"]["tokens"]
    assert alone.perplexity == pytest.approx(result.per_source["code"]["perplexity"], rel=1e-6)


def test_batch_size_does_not_change_result(model, tokenizer, monkeypatch):
    lengths = []
    score_batch = evaluate_module._score_batch

    def spy(model, items):
        lengths.append({w.end - w.start for _, w in items})
        return score_batch(model, items)

    monkeypatch.setattr(evaluate_module, "_score_batch", spy)
    documents = mixed_docs()
    one = run(model, documents, tokenizer, seq_len=24, stride=10, batch_size=1)
    three = run(model, documents, tokenizer, seq_len=24, stride=10, batch_size=3)
    assert any(len(batch) > 1 for batch in lengths)  # some batch really was padded
    assert one.tokens == three.tokens
    assert one.perplexity == pytest.approx(three.perplexity, rel=1e-5)
    for source, stats in one.per_source.items():
        assert stats["perplexity"] == pytest.approx(three.per_source[source]["perplexity"], rel=1e-5)


def test_max_tokens_truncates_each_source(model, tokenizer):
    result = run(model, mixed_docs(), tokenizer, seq_len=24, max_tokens=20)
    assert result.per_source["long"]["tokens"] == 20
    assert result.per_source["code"]["tokens"] == 20
    assert result.per_source["short"]["tokens"] < 20


@pytest.mark.parametrize("stride", [None, 7])
def test_max_tokens_scores_the_first_tokens_with_unchanged_context(model, tokenizer, stride):
    """The kept tokens are the first max_tokens of the full run, each with the same context."""
    documents = long_docs()
    stream = stream_of(documents, tokenizer)
    windows = plan_windows(len(stream.ids), 24, stride)
    nll, count = 0.0, 0
    for w in windows:  # token by token, until 50 are scored
        for end in range(w.score_from + 1, w.end + 1):
            if count < 50 and stream.scorable[end - 1]:
                nll += window_nll_by_hand(model, stream, w.start, end, end - 1)[0]
                count += 1
    result = run(model, documents, tokenizer, seq_len=24, stride=stride, max_tokens=50)
    assert result.tokens == count == 50
    assert result.perplexity == pytest.approx(math.exp(nll / 50), rel=1e-5)


def test_nothing_to_score(model, tokenizer):
    with pytest.raises(ValueError, match="nothing to score"):
        run(model, docs(("x", ""), ("y", "")), tokenizer, seq_len=32)  # each stream is its BOS alone


def test_invalid_batch_size(model, tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        run(model, long_docs(), tokenizer, batch_size=0)


# --- loading from disk -------------------------------------------------------------


def test_model_directory_matches_loaded_model(model, model_dirs):
    documents = long_docs(1)
    from_dir = evaluate_perplexity(model_dirs[0], documents, seq_len=32, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[0])
    in_memory = run(model, documents, tokenizer, seq_len=32)
    assert from_dir.model == model_dirs[0]
    assert from_dir.tokens == in_memory.tokens
    assert from_dir.perplexity == pytest.approx(in_memory.perplexity, rel=1e-5)


def test_dtype_and_name(model_dirs):
    result = evaluate_perplexity(
        model_dirs[0], long_docs(1), seq_len=32, dtype=torch.bfloat16, name="a-bf16", progress=True
    )
    assert result.model == "a-bf16"
    assert math.isfinite(result.perplexity)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match="model directory not found"):
        evaluate_perplexity(str(tmp_path / "nope"), long_docs(1))


def test_model_without_tokenizer(model_dirs, tokenizer):
    with pytest.raises(ValueError, match=r"no tokenizer could be loaded from .*bare"):
        evaluate_perplexity(model_dirs[2], long_docs(1), seq_len=32, progress=False)
    # a tokenizer given explicitly is enough
    result = evaluate_perplexity(model_dirs[2], long_docs(1), seq_len=32, tokenizer=tokenizer, progress=False)
    assert result.tokens > 0


def test_evaluate_models(model_dirs):
    results = evaluate_models(model_dirs[:2], long_docs(1), seq_len=32, progress=False)
    assert [r.model for r in results] == model_dirs[:2]
    assert results[0].tokens == results[1].tokens
    assert results[0].perplexity != results[1].perplexity
    with pytest.raises(TypeError, match="name"):
        evaluate_models(model_dirs[:1], long_docs(1), name="x")


# --- reporting -----------------------------------------------------------------------


RESULTS = [
    EvalResult(
        "base-moe",
        10.0,
        300,
        {"code": {"perplexity": 8.0, "tokens": 100}, "web": {"perplexity": 11.0, "tokens": 200}},
    ),
    EvalResult("dense", 12.5, 100, {"code": {"perplexity": 12.5, "tokens": 100}}),
]


def test_format_results_table():
    table = format_results_table(RESULTS, reference="base-moe")
    lines = table.splitlines()
    assert lines[0].split() == ["model", "tokens", "ppl", "code", "web", "ratio"]
    assert lines[1].split() == ["base-moe", "300", "10.000", "8.000", "11.000", "1.0000"]
    assert lines[2].split() == ["dense", "100", "12.500", "12.500", "-", "1.2500"]
    assert len({len(line) for line in lines}) == 1  # aligned: right-justified numbers


def test_format_results_table_without_reference():
    assert "ratio" not in format_results_table(RESULTS)
    with pytest.raises(ValueError, match="reference 'other'"):
        format_results_table(RESULTS, reference="other")


def test_write_results_json(tmp_path):
    path = tmp_path / "results.json"
    write_results_json(RESULTS, path)
    loaded = json.loads(path.read_text())
    assert loaded == [r.to_dict() for r in RESULTS]
    assert loaded[1] == {
        "model": "dense",
        "perplexity": 12.5,
        "tokens": 100,
        "per_source": {"code": {"perplexity": 12.5, "tokens": 100}},
    }


def test_seq_len_beyond_max_position_embeddings_is_refused(model, model_dirs, tokenizer, monkeypatch):
    """Windows longer than the model's positions are refused, for a loaded model and a
    directory alike, and the directory's weights are never loaded."""
    with pytest.raises(ValueError, match="--seq-len 257 is more than the max_position_embeddings 256"):
        run(model, long_docs(1), tokenizer, seq_len=257)
    run(model, long_docs(1), tokenizer, seq_len=256)  # the limit itself is fine

    def never(*args, **kwargs):
        raise AssertionError("weights loaded before seq_len was checked")

    monkeypatch.setattr(evaluate_module.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        evaluate_models(model_dirs[:2], long_docs(1), seq_len=300, progress=False)


# --- what is refused before a model is scored --------------------------------------------


def never_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n".join(CORPUS))
    return path


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_a_zero_token_budget_is_refused_before_loading(model_dirs, text_file, monkeypatch, max_tokens):
    monkeypatch.setattr(evaluate_module.AutoModelForCausalLM, "from_pretrained", never_loaded)
    with pytest.raises(ValueError, match=f"--max-tokens {max_tokens}: the budget .* is zero"):
        evaluate_perplexity(model_dirs[0], long_docs(1), seq_len=32, max_tokens=max_tokens, progress=False)
    result = run_cli("eval", model_dirs[0], "--data", text_file, "--seq-len", 32, "--max-tokens", max_tokens)
    assert_one_line_error(result, f"--max-tokens {max_tokens}: the budget of scored tokens per source is zero")


@pytest.mark.parametrize(
    "device, fragment",
    [
        pytest.param(
            "cuda",
            "--device cuda: CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
        ("tpu", "--device tpu: not a device torch knows"),
    ],
)
def test_eval_refuses_an_unusable_device_before_loading(model_dirs, text_file, monkeypatch, device, fragment):
    monkeypatch.setattr(evaluate_module.AutoModelForCausalLM, "from_pretrained", never_loaded)
    result = run_cli("eval", model_dirs[0], "--data", text_file, "--seq-len", 32, "--device", device)
    assert_one_line_error(result, fragment)


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory, tokenizer):
    """A Mistral saved as its base model: no LM head, `architectures: [MistralModel]`."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "base"
    MistralModel(make_model(0, len(tokenizer)).config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_base_model_is_refused_before_any_model_is_scored(model_dirs, base_model_dir, text_file, monkeypatch):
    monkeypatch.setattr(evaluate_module.AutoModelForCausalLM, "from_pretrained", never_loaded)
    with pytest.raises(ValueError, match="is a MistralModel checkpoint: a base model without an LM head"):
        evaluate_models([model_dirs[0], str(base_model_dir)], long_docs(1), seq_len=32, progress=False)
    result = run_cli("eval", model_dirs[0], base_model_dir, "--data", text_file, "--seq-len", 32)
    assert_one_line_error(result, "base model without an LM head, not a causal LM")


def test_a_checkpoint_without_its_lm_head_is_refused(base_model_dir, tmp_path):
    """Whatever its config says: weights transformers would initialise randomly are refused."""
    path = tmp_path / "headless"
    shutil.copytree(base_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"not a complete causal LM: lm_head\.weight missing"):
        evaluate_perplexity(str(path), long_docs(1), seq_len=32, progress=False)


def test_models_with_different_tokenizers_are_refused(model_dirs, tmp_path, monkeypatch):
    """The fixture's tokenizer with its special tokens in another order: a vocabulary of the
    same size, and other ids for the same text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=120,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    other = tmp_path / "other"
    shutil.copytree(model_dirs[1], other)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        other
    )
    text = tmp_path / "text.txt"
    text.write_text("\n".join(CORPUS))
    monkeypatch.setattr(evaluate_module.AutoModelForCausalLM, "from_pretrained", never_loaded)
    with pytest.raises(ValueError, match="tokenize the evaluation text differently"):
        evaluate_models([model_dirs[0], str(other)], long_docs(1), seq_len=32, progress=False)
    result = run_cli("eval", model_dirs[0], other, "--data", text, "--seq-len", 32)
    assert_one_line_error(result, f"{other} and {model_dirs[0]} tokenize the evaluation text differently")
