# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Text loading shared by calibration and evaluation.

A *source* is one labelled stream of documents (a file, or a hub dataset), so
that calibration can balance domains and evaluation can report perplexity per
domain. Formats, chosen to be predictable rather than clever:

* ``.txt``: with ``txt_documents="blank_lines"`` (calibration), documents are
  separated by two or more empty lines (three or more newlines in a row); a
  single empty line stays inside a document, because prose and code use it for
  paragraphs. With ``txt_documents="file"`` (evaluation), the whole file is one
  document, its text exactly as ``open(path).read()`` gives it, so that its
  perplexity is the usual one-stream computation.
* ``.jsonl``: one JSON object per line; the document is ``obj[text_field]``.
  Blank lines are skipped.
* ``.parquet``: the ``text_field`` column.
* a directory: every file with one of the above extensions below it, in sorted
  order; other files are ignored. The source label is the file's path relative
  to the directory without its extension (the file stem for top-level files).
* anything else that is not a path: a ``datasets`` dataset name, loaded with
  ``datasets.load_dataset(name, split=split)``.

Whitespace-only documents are dropped everywhere; a source that yields no
documents at all is an error rather than a silent empty calibration set.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "DataError",
    "Document",
    "load_documents",
    "tokenize_documents",
]

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")

_TXT_SEPARATOR = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


class DataError(Moe2DenseError, ValueError):
    """A text source is missing, malformed or empty; the message names it."""


@dataclass(frozen=True)
class Document:
    """One document and the label of the source it came from."""

    source: str
    text: str


def load_documents(
    source: str | os.PathLike,
    *,
    text_field: str = "text",
    split: str = "train",
    max_documents: int | None = None,
    txt_documents: Literal["blank_lines", "file"] = "blank_lines",
) -> list[Document]:
    """Load documents from a local file or directory, or a ``datasets`` name.

    A string is treated as a local path when it exists, is a
    :class:`os.PathLike`, starts with ``/``, ``.`` or ``~``, ends with ``/``,
    or has a file extension; so a mistyped file name is reported as a missing path instead
    of being looked up on the hub. ``max_documents`` keeps the first N
    non-empty documents in load order. ``txt_documents`` says what a document of
    a ``.txt`` file is (see the module docstring).
    """
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be at least 1, got {max_documents}")
    if txt_documents not in ("blank_lines", "file"):
        raise DataError(f"txt_documents must be 'blank_lines' or 'file', got {txt_documents!r}")
    if _looks_like_path(source):
        path = Path(source).expanduser()
        documents = _local_documents(path, text_field, txt_documents)
        label = str(path)
    else:
        documents = _dataset_documents(str(source), text_field, split)
        label = f"dataset {source!r} (split {split!r})"
    result = []
    for document in documents:
        if document.text.strip():
            result.append(document)
            if max_documents is not None and len(result) >= max_documents:
                break
    if not result:
        raise DataError(f"{label}: no documents (no non-empty text)")
    return result


def tokenize_documents(
    documents: Iterable[Document], tokenizer, *, add_bos: bool = True
) -> list[tuple[str, list[int]]]:
    """Tokenize each document to ``(source, ids)``.

    Special tokens are added here rather than by the tokenizer, because
    tokenizers disagree on what ``add_special_tokens`` adds (some append EOS
    too); with ``add_bos`` each document starts with the BOS token when the
    tokenizer has one, which marks document boundaries once documents are
    concatenated.
    """
    bos = tokenizer.bos_token_id if add_bos else None
    result = []
    for document in documents:
        ids = list(tokenizer(document.text, add_special_tokens=False)["input_ids"])
        if bos is not None:
            ids.insert(0, bos)
        result.append((document.source, ids))
    return result


def _looks_like_path(source: str | os.PathLike) -> bool:
    if not isinstance(source, str) or os.path.exists(source):
        return True
    return source.startswith(("/", ".", "~")) or source.endswith("/") or Path(source).suffix != ""


def _local_documents(path: Path, text_field: str, txt_documents: str) -> Iterator[Document]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_EXTENSIONS)
        if not files:
            raise DataError(f"{path}: directory has no {'/'.join(SUPPORTED_EXTENSIONS)} files")
        for file in files:
            label = file.relative_to(path).with_suffix("").as_posix()
            yield from _file_documents(file, label, text_field, txt_documents)
    else:
        yield from _file_documents(path, path.stem, text_field, txt_documents)


def _file_documents(path: Path, label: str, text_field: str, txt_documents: str) -> Iterator[Document]:
    if path.suffix == ".txt":
        text = _decode(path.read_bytes(), path).replace("\r\n", "\n")
        if txt_documents == "file":  # newlines as Python's text mode reads them
            yield Document(label, text.replace("\r", "\n"))
            return
        for chunk in _TXT_SEPARATOR.split(text):
            yield Document(label, chunk.strip())
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, label, text_field)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path, label, text_field)
    else:
        raise DataError(
            f"{path}: unsupported extension {path.suffix!r} "
            f"(expected one of {', '.join(SUPPORTED_EXTENSIONS)}, or a directory)"
        )


def _jsonl_documents(path: Path, label: str, text_field: str) -> Iterator[Document]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{number}: no field {text_field!r}")
            yield Document(label, _as_text(record[text_field], f"{path}:{number}"))


def _parquet_documents(path: Path, label: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    for value in pq.read_table(path, columns=[text_field]).column(0).to_pylist():
        yield Document(label, _as_text(value, str(path)))


def _dataset_documents(name: str, text_field: str, split: str) -> Iterator[Document]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, bad split: all end up here
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise DataError(
            f"dataset {name!r} (split {split!r}) could not be loaded and is not a local path: {reason}"
        ) from e
    if text_field not in dataset.column_names:
        raise DataError(f"dataset {name!r}: no column {text_field!r} (columns: {', '.join(dataset.column_names)})")
    for row in dataset.select_columns([text_field]):
        yield Document(name, _as_text(row[text_field], f"dataset {name!r}"))


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    """UTF-8 text, or a DataError naming the file and line: a binary file (or text in
    another encoding) passed as data would otherwise fail with a UnicodeDecodeError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}): "
            "a binary file, or text in another encoding (convert it to UTF-8)"
        ) from None
    if "\x00" in text:  # valid UTF-8, but text files hold no NUL bytes
        line = first_line + text.count("\n", 0, text.index("\x00"))
        raise DataError(f"{path}:{line}: NUL byte: a binary file, not text")
    return text


def _as_text(value, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: text field is {type(value).__name__}, not a string")
    return value
