# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergekit_moe2dense.data import DataError, Document, load_documents, tokenize_documents


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def write_parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def texts(documents):
    return [d.text for d in documents]


# --- formats -------------------------------------------------------------------


def test_txt_splits_on_two_or_more_empty_lines_only(tmp_path):
    path = write(tmp_path / "code.txt", "a\n\nstill a\n\n\nb\r\n\r\n\r\n\r\n  c  \n \n\t\n")
    documents = load_documents(path)
    assert texts(documents) == ["a\n\nstill a", "b", "c"]
    assert {d.source for d in documents} == {"code"}


def test_txt_as_one_document_is_the_file_as_python_reads_it(tmp_path):
    path = tmp_path / "code.txt"
    path.write_bytes(b"\n a\r\n\r\n\r\nb\rc \n\n")
    documents = load_documents(path, txt_documents="file")
    assert documents == [Document("code", open(path, encoding="utf-8").read())]
    assert documents[0].text == "\n a\n\n\nb\nc \n\n"
    with pytest.raises(DataError, match="txt_documents"):
        load_documents(path, txt_documents="lines")


def test_txt_accepts_str_path(tmp_path):
    write(tmp_path / "prose.txt", "one document")
    assert load_documents(str(tmp_path / "prose.txt")) == [Document("prose", "one document")]


def test_jsonl_reads_field_and_skips_blank_lines_and_empty_texts(tmp_path):
    path = write(
        tmp_path / "chat.jsonl",
        '{"text": "x", "id": 1}\n\n{"text": "  "}\n{"text": null}\n{"text": "y"}\n',
    )
    assert load_documents(path) == [Document("chat", "x"), Document("chat", "y")]


def test_jsonl_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"content": "hello", "text": 3}])
    assert texts(load_documents(path, text_field="content")) == ["hello"]


def test_parquet_reads_column(tmp_path):
    path = write_parquet(tmp_path / "web.parquet", {"text": ["p", "", "q"], "n": [1, 2, 3]})
    assert load_documents(path) == [Document("web", "p"), Document("web", "q")]


def test_directory_is_recursive_sorted_and_ignores_other_files(tmp_path):
    write(tmp_path / "b.txt", "b1\n\n\nb2")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    write_parquet(tmp_path / "sub" / "c.parquet", {"text": ["c1"]})
    write(tmp_path / "README.md", "not data")
    documents = load_documents(tmp_path)
    assert [(d.source, d.text) for d in documents] == [
        ("a", "a1"),
        ("b", "b1"),
        ("b", "b2"),
        ("sub/c", "c1"),
    ]


def test_max_documents_keeps_first_non_empty(tmp_path):
    path = write(tmp_path / "t.txt", "\n\n\n1\n\n\n2\n\n\n3")
    assert texts(load_documents(path, max_documents=2)) == ["1", "2"]


def test_dataset_name_goes_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["d1", "", "d2"], "meta": [0, 1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    documents = load_documents("org/corpus", split="validation")
    assert calls == [("org/corpus", "validation")]
    assert documents == [Document("org/corpus", "d1"), Document("org/corpus", "d2")]


# --- errors ----------------------------------------------------------------------


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("name", ["missing.txt", "./missing", "missing_dir/"])
def test_missing_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no such file or directory"):
        load_documents(name)


def test_missing_pathlike(tmp_path):
    with pytest.raises(DataError, match=r"nope.*no such file"):
        load_documents(tmp_path / "nope")


def test_unsupported_extension(tmp_path):
    path = write(tmp_path / "data.csv", "text\nx\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported extension '\.csv'"):
        load_documents(path)


def test_directory_without_supported_files(tmp_path):
    write(tmp_path / "notes.md", "x")
    with pytest.raises(DataError, match="directory has no .txt/.jsonl/.parquet files"):
        load_documents(tmp_path)


@pytest.mark.parametrize(
    "name, content",
    [("empty.txt", ""), ("blank.txt", "\n \n\n\n\t\n"), ("blank.jsonl", '{"text": " "}\n\n')],
)
def test_no_documents(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=rf"{name}: no documents"):
        load_documents(path)


def test_empty_parquet_has_no_documents(tmp_path):
    path = write_parquet(tmp_path / "e.parquet", {"text": pa.array([], pa.string())})
    with pytest.raises(DataError, match="no documents"):
        load_documents(path)


def test_jsonl_invalid_line_reports_line_number(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_documents(path)


def test_jsonl_missing_field_reports_line_number(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(DataError, match=r"f\.jsonl:2: no field 'text'"):
        load_documents(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "list.jsonl", '["text"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: no field 'text'"):
        load_documents(path)


def test_jsonl_non_string_text(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"n\.jsonl:1: text field is int, not a string"):
        load_documents(path)


def test_parquet_missing_column(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"body": ["x"]})
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns: body\)"):
        load_documents(path)


def test_corrupt_parquet(tmp_path):
    path = write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        load_documents(path)


def test_dataset_that_cannot_be_loaded(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"dataset 'org/corpus' .*could not be loaded.*Couldn't reach") as info:
        load_documents("org/corpus")
    assert "\n" not in str(info.value)


def test_dataset_missing_column(monkeypatch):
    import datasets

    dataset = datasets.Dataset.from_dict({"body": ["x"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: dataset)
    with pytest.raises(DataError, match=r"dataset 'corpus': no column 'text' \(columns: body\)"):
        load_documents("corpus")


def test_max_documents_must_be_positive(tmp_path):
    path = write(tmp_path / "t.txt", "x")
    with pytest.raises(DataError, match="max_documents must be at least 1"):
        load_documents(path, max_documents=0)


# --- tokenization ------------------------------------------------------------------


class CharTokenizer:
    """Stands in for a HF tokenizer: one id per character, and its own special tokens."""

    def __init__(self, bos_token_id):
        self.bos_token_id = bos_token_id

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        if add_special_tokens:  # tokenize_documents must not rely on these
            ids = [1, *ids, 2]
        return {"input_ids": ids}


def test_tokenize_documents_adds_bos_itself():
    documents = [Document("a", "hi"), Document("b", "x")]
    assert tokenize_documents(documents, CharTokenizer(bos_token_id=0)) == [
        ("a", [0, ord("h"), ord("i")]),
        ("b", [0, ord("x")]),
    ]


def test_tokenize_documents_without_bos():
    documents = [Document("a", "hi")]
    expected = [("a", [ord("h"), ord("i")])]
    assert tokenize_documents(documents, CharTokenizer(0), add_bos=False) == expected
    assert tokenize_documents(documents, CharTokenizer(None)) == expected
