# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Perplexity of a causal LM over labelled documents, overall and per source.

The computation is the standard one (transformers' perplexity guide), so that
anyone can reproduce the figure:

* Each source is one token stream: its documents, each tokenized without
  special tokens and preceded by the tokenizer's BOS token (when it has one),
  concatenated. A ``.txt`` file loaded with :func:`load_eval_documents` is one
  document, so its stream is ``BOS + tokens(file)``; documents of jsonl,
  parquet or a dataset keep their boundaries, each behind its BOS. BOS tokens
  are context only: they are never scored.
* The stream is cut into windows of at most ``seq_len`` tokens starting at
  ``0, stride, 2 * stride, ...`` (default ``stride = seq_len``: non-overlapping
  windows). Each window scores only the tokens that the previous window did
  not; a window's first token has no context and is never scored. So with the
  default stride the first token of each window is context only; with
  ``stride < seq_len`` (sliding windows) every token after the first is scored
  once, with at least ``seq_len - stride`` tokens of context. The plan is
  :func:`plan_windows`.
* Perplexity is ``exp(sum NLL / scored tokens)``, the NLL summed in float64;
  the result does not depend on ``batch_size``.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from pydantic import model_validator
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from mergekit_moe2dense.data import Document, load_documents
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.report_files import write_report_text
from mergekit_moe2dense.settings import Settings

__all__ = [
    "EvalResult",
    "EvaluationError",
    "PerplexitySettings",
    "TokenStream",
    "Window",
    "check_causal_lm",
    "check_seq_len",
    "evaluate_models",
    "evaluate_perplexity",
    "format_results_table",
    "load_eval_documents",
    "plan_windows",
    "read_model_config",
    "token_streams",
    "write_results_json",
]


class EvaluationError(Moe2DenseError, ValueError):
    """Bad evaluation input: a missing model, no tokenizer, bad window sizes."""


DEFAULT_SEQ_LEN = 512


class PerplexitySettings(Settings):
    """How perplexity is scored: windows of `seq_len` tokens starting every `stride` tokens
    (default: `seq_len`, non-overlapping windows), `batch_size` windows at a time on `device`, at
    most `max_tokens` scored tokens per source (default: all)."""

    error: ClassVar = EvaluationError

    seq_len: int = DEFAULT_SEQ_LEN
    stride: int | None = None
    batch_size: int = 4
    device: str = "cpu"
    max_tokens: int | None = None

    @model_validator(mode="after")
    def _check(self) -> PerplexitySettings:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(
                f"--max-tokens {self.max_tokens}: the budget of scored tokens per source is zero, so nothing would "
                "be scored; give a positive number, or leave --max-tokens out to score every token"
            )
        plan_windows(0, self.seq_len, self.stride)  # raises on a bad seq_len or stride
        return self


@dataclass
class EvalResult:
    """Perplexity of one model; ``per_source`` maps source -> perplexity, tokens."""

    model: str
    perplexity: float
    tokens: int
    per_source: dict[str, dict]

    def to_dict(self) -> dict:
        return asdict(self)


class Window(NamedTuple):
    """Model input ``stream[start:end]``; targets ``stream[score_from:end]`` are scored."""

    start: int
    end: int
    score_from: int


class TokenStream(NamedTuple):
    """A source's tokens, and which of them may be scored (False for BOS tokens)."""

    ids: list[int]
    scorable: list[bool]

    def truncated(self, max_scored: int, windows: list[Window]) -> TokenStream:
        """The shortest prefix that keeps the first ``max_scored`` tokens ``windows`` score.

        Windows start at fixed positions, so cutting the stream only shortens
        its last window: every token kept is scored with the same context.
        """
        count = 0
        for w in windows:
            for position in range(w.score_from, w.end):
                if count == max_scored:
                    return TokenStream(self.ids[:position], self.scorable[:position])
                count += self.scorable[position]
        return self


def load_eval_documents(source: str | os.PathLike, **kwargs) -> list[Document]:
    """:func:`~mergekit_moe2dense.data.load_documents` for evaluation: a ``.txt``
    file is one document (one stream), not split at blank lines."""
    return load_documents(source, txt_documents="file", **kwargs)


def token_streams(documents: list[Document], tokenizer) -> dict[str, TokenStream]:
    """One stream per source: ``BOS doc_1 BOS doc_2 ...`` (no BOS if the tokenizer
    has none), BOS tokens not scorable. Special tokens are added here rather than
    by the tokenizer, which may append EOS too."""
    bos = tokenizer.bos_token_id
    streams: dict[str, TokenStream] = {}
    for document in documents:
        stream = streams.setdefault(document.source, TokenStream([], []))
        if bos is not None:
            stream.ids.append(bos)
            stream.scorable.append(False)
        ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        stream.ids.extend(ids)
        stream.scorable.extend([True] * len(ids))
    return streams


def plan_windows(n: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """Windows over a stream of ``n`` tokens, as transformers' perplexity guide plans them.

    Window ``i`` is ``[i * stride, min(i * stride + seq_len, n))``, until one
    reaches the stream's end; it scores the tokens after the previous window's
    end, and never its own first token (which has no context). With
    ``stride = seq_len`` (the default) the windows do not overlap and each
    scores all of its tokens but the first; with a smaller stride, every token
    from position 1 on is scored exactly once. Windows that would score nothing
    are left out.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise EvaluationError(f"seq_len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise EvaluationError(f"stride must be between 1 and seq_len={seq_len}, got {stride}")
    windows, previous_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        score_from = max(begin + 1, previous_end)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        previous_end = end
        if end == n:
            break
    return windows


def evaluate_perplexity(
    model: str | PreTrainedModel,
    documents: list[Document],
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    name: str | None = None,
    **options,
) -> EvalResult:
    """Perplexity of ``model`` (a local model directory, or a loaded model).

    ``options`` are :class:`PerplexitySettings`' (``seq_len``, ``stride``, ``batch_size``,
    ``device``, ``max_tokens``), checked before anything is loaded. A directory is loaded onto
    ``device`` in ``dtype`` (default: the dtype in its config); a loaded model is used where it
    is. The tokenizer is loaded from the model directory (or ``model.name_or_path``) unless
    given. ``max_tokens`` caps the scored tokens of each source (not of the total), so that
    every source keeps its share. BOS tokens are never scored (see the module docstring for the
    exact rule). A ``seq_len`` beyond the model's ``max_position_embeddings`` is refused, and so
    is a checkpoint that lacks weights of the causal LM (they would be random).
    """
    settings = PerplexitySettings(**options)
    model, tokenizer, name = _scoring_model(model, settings, tokenizer=tokenizer, dtype=dtype, name=name)
    model.eval()
    streams = token_streams(documents, tokenizer)
    if settings.max_tokens is not None:
        streams = {
            s: stream.truncated(settings.max_tokens, plan_windows(len(stream.ids), settings.seq_len, settings.stride))
            for s, stream in streams.items()
        }
    nll, tokens = _score_streams(model, streams, settings, progress=progress, name=name)
    total = sum(tokens.values())
    if total == 0:
        raise EvaluationError("nothing to score: no source has a token after its first BOS")
    per_source = {s: {"perplexity": _ppl(nll[s], tokens[s]), "tokens": tokens[s]} for s in streams}
    return EvalResult(name, _ppl(sum(nll.values()), total), total, per_source)


def _scoring_model(model, settings: PerplexitySettings, *, tokenizer, dtype, name):
    """(the model, its tokenizer, its name in the results): a loaded model as it is, a directory
    checked (positions, an LM head) and then loaded onto `settings.device`."""
    if isinstance(model, PreTrainedModel):
        name = name or model.name_or_path or type(model).__name__
        check_seq_len(model.config, settings.seq_len, name)
        return model, tokenizer or _load_tokenizer(model.name_or_path), name
    path = Path(model)
    name = name or str(model)
    config = read_model_config(model)
    check_seq_len(config, settings.seq_len, name)
    check_causal_lm(config, name)
    tokenizer = tokenizer or _load_tokenizer(path)
    return _load_causal_lm(path, dtype, name).to(settings.device), tokenizer, name


def _score_streams(model, streams: dict[str, TokenStream], settings: PerplexitySettings, *, progress, name):
    """Summed NLL and scored tokens per source, over every window of every stream, `batch_size`
    windows at a time (in order: the sums do not depend on the batch size)."""
    seq_len, stride, batch_size = settings.seq_len, settings.stride, settings.batch_size
    jobs = [(s, w) for s, stream in streams.items() for w in plan_windows(len(stream.ids), seq_len, stride)]
    nll = dict.fromkeys(streams, 0.0)
    tokens = dict.fromkeys(streams, 0)
    with tqdm(total=len(jobs), disable=not progress, desc=name, unit="window") as bar:
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i : i + batch_size]
            sums, counts = _score_batch(model, [(streams[s], w) for s, w in batch])
            for (source, _), window_nll, count in zip(batch, sums.tolist(), counts.tolist()):
                nll[source] += window_nll
                tokens[source] += count
            bar.update(len(batch))
    return nll, tokens


def evaluate_models(models: list[str], documents: list[Document], **kwargs) -> list[EvalResult]:
    """Evaluate model directories one at a time, freeing each before the next; `kwargs` are
    :func:`evaluate_perplexity`'s (each result is named after its model). Every model is checked
    (positions, an LM head, the same tokens) before the first is scored."""
    if "name" in kwargs:
        raise TypeError("evaluate_models names each result after its model; drop name=")
    for model in models:  # every model before the first is scored
        config = read_model_config(model)
        check_seq_len(config, kwargs.get("seq_len", DEFAULT_SEQ_LEN), str(model))
        check_causal_lm(config, str(model))
    if len(models) > 1 and kwargs.get("tokenizer") is None:  # a tokenizer given is every model's
        _check_same_tokens(models, documents)
    results = []
    for model in models:
        results.append(evaluate_perplexity(model, documents, **kwargs))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def format_results_table(results: list[EvalResult], reference: str | None = None) -> str:
    """An aligned text table; ``ratio`` is perplexity / the ``reference`` model's."""
    sources = list(dict.fromkeys(s for r in results for s in r.per_source))
    header = ["model", "tokens", "ppl", *sources]
    if reference is not None:
        ref = next((r for r in results if r.model == reference), None)
        if ref is None:
            raise EvaluationError(f"reference {reference!r} is not among the evaluated models")
        header.append("ratio")
    rows = [header]
    for r in results:
        row = [r.model, str(r.tokens), f"{r.perplexity:.3f}"]
        row += [f"{r.per_source[s]['perplexity']:.3f}" if s in r.per_source else "-" for s in sources]
        if reference is not None:
            row.append(f"{r.perplexity / ref.perplexity:.4f}")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]) for row in rows
    )


def write_results_json(results: list[EvalResult], path: str | os.PathLike) -> None:
    """Write ``[{"model", "perplexity", "tokens", "per_source"}, ...]`` as JSON, atomically."""
    write_report_text(path, json.dumps([r.to_dict() for r in results], indent=2) + "\n")


def check_seq_len(config, seq_len: int, name: str) -> None:
    """Refuses windows longer than the model has positions for: most families run
    them without an error and score positions the model was never trained on. A multimodal
    checkpoint's limit is its text model's (what AutoModelForCausalLM loads from it)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise EvaluationError(
            f"--seq-len {seq_len} is more than the max_position_embeddings {limit} of {name}; "
            f"use --seq-len {limit} or less"
        )


def check_causal_lm(config, name: str) -> None:
    """Refuses a checkpoint saved as its family's base model (``architectures: [MistralModel]``):
    it has no LM head, and AutoModelForCausalLM would score with a randomly initialised one.
    A head tied to the embeddings is no loss: it is the embedding matrix. Some multimodal
    families' base class is their generation model (``Llama4ForConditionalGeneration``): it has one."""
    base = MODEL_MAPPING_NAMES.get(config.model_type)
    if (
        base
        and "For" not in base
        and config.architectures == [base]
        and not getattr(config.get_text_config(), "tie_word_embeddings", False)
    ):
        raise EvaluationError(
            f"{name} is a {base} checkpoint: a base model without an LM head, not a causal LM; "
            "eval scores causal LMs (give the checkpoint saved with its LM head)"
        )


def _load_causal_lm(path, dtype, name: str) -> PreTrainedModel:
    """The causal LM at ``path``; refused when transformers had to initialise some of its
    weights (a checkpoint of another head, or an incomplete one): its scores would be noise."""
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype if dtype is not None else "auto", output_loading_info=True
    )
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise EvaluationError(
            f"{name} is not a complete causal LM: {shown} missing from the checkpoint (transformers would "
            "initialise them randomly); eval scores causal LMs saved with their LM head"
        )
    return model


def _check_same_tokens(models: list[str], documents: list[Document]) -> None:
    """Perplexities are comparable only over the same tokens: every model's tokenizer must
    turn the documents into the same token streams as the first model's."""
    first = token_streams(documents, _load_tokenizer(models[0]))
    for model in models[1:]:
        if token_streams(documents, _load_tokenizer(model)) != first:
            raise EvaluationError(
                f"{model} and {models[0]} tokenize the evaluation text differently: their perplexities "
                "would be over different tokens and not comparable; evaluate them in separate runs"
            )


def read_model_config(model: str | os.PathLike):
    """The config of the model directory ``model``, or an EvaluationError saying why not."""
    if not Path(model).is_dir():
        raise EvaluationError(f"model directory not found: {model}")
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EvaluationError(f"{model}: cannot read the model's config.json ({reason})") from None


def _load_tokenizer(path):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"no tokenizer could be loaded from {path!s}; pass tokenizer=") from e


@torch.inference_mode()
def _score_batch(model, items: list[tuple[TokenStream, Window]]):
    """Summed NLL (float64) and scored-token count of each window in a batch.

    Windows are right-padded; with causal attention, padding after a window
    cannot affect it, and the attention mask and target mask exclude it too.
    """
    length = max(w.end - w.start for _, w in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    attention = torch.zeros(len(items), length, dtype=torch.long)
    scored = torch.zeros(len(items), length, dtype=torch.bool)
    for row, (stream, w) in enumerate(items):
        ids[row, : w.end - w.start] = torch.tensor(stream.ids[w.start : w.end])
        attention[row, : w.end - w.start] = 1
        scored[row, w.score_from - w.start : w.end - w.start] = torch.tensor(stream.scorable[w.score_from : w.end])
    ids, attention, scored = ids.to(model.device), attention.to(model.device), scored[:, 1:]
    logprobs = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
    target_nll = -logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1).double().cpu()
    return target_nll.where(scored, 0.0).sum(1), scored.sum(1)


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens) if tokens else math.nan
