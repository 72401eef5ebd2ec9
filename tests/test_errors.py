# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Bad input that used to end in a traceback: each is now one line, before any work,
and leaves no output directory behind."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mergekit_moe2dense.cli as cli
from helpers import BIN, assert_one_line_error, run_cli, write_config
from mergekit_moe2dense.config import ConfigError, Moe2DenseConfig, check_seq_len
from mergekit_moe2dense.data import DataError, load_documents
from mergekit_moe2dense.io.source import SourceModel

# conftest's tiny Mixtral has max_position_embeddings 256


def assert_no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists(), list(out.iterdir())
    assert not list(tmp_path.glob(f"{out.name}.incomplete-*"))


def edit_config(path: Path, **changes) -> Path:
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if key.startswith("calibration."):
            data["calibration"][key.split(".", 1)[1]] = value
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def hub_offline(monkeypatch):
    """No hub to reach, deterministically (and without network retries)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# -- 1. a model path that does not exist ----------------------------------------------


@pytest.mark.parametrize("missing", ["/no/such/moe", "./no-such-moe", "~/no-such-moe"])
def test_missing_local_model_is_one_line(missing, calib_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", missing, calib_dir)
    assert_one_line_error(run_cli(config, out), f"model not found: no such directory {re.escape(missing)}")
    assert_no_output(tmp_path, out)
    assert_one_line_error(run_cli("inspect", missing), f"no such directory {re.escape(missing)}")
    assert_one_line_error(run_cli("eval", missing, "--data", calib_dir), f"not found: {re.escape(missing)}")


def test_hub_id_without_a_hub_is_one_line(hub_offline, calib_dir, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", "moe2dense-tests/no-such-moe", calib_dir)
    result = run_cli(config, out)
    assert_one_line_error(result, r"moe2dense-tests/no-such-moe is not a local directory.*hub could not provide it")
    assert_no_output(tmp_path, out)
    assert_one_line_error(run_cli("inspect", "moe2dense-tests/no-such-moe"), "hub could not provide it")


def test_lora_reference_is_one_line(random_moe, calib_dir, tmp_path):
    config = write_config(tmp_path / "c.yml", f"{random_moe['legacy']}+{tmp_path / 'lora'}", calib_dir)
    assert_one_line_error(run_cli(config, tmp_path / "out"), "LoRA reference is not supported")


# -- 2. binary or non-UTF-8 data ------------------------------------------------------


def binary_file(path: Path) -> Path:
    path.write_bytes(bytes(range(128, 256)) + bytes(range(256)) * 8)
    return path


def test_binary_text_file_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"data\.txt:1: not UTF-8 text \(byte 0x80\)"):
        load_documents(binary_file(tmp_path / "data.txt"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\nsecond line, caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt:2: not UTF-8 text \(byte 0xe9\)"):
        load_documents(latin)


def test_non_utf8_jsonl_names_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"data\.jsonl:3: not UTF-8 text"):
        load_documents(path)


def test_nul_bytes_are_binary(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"some text\nmore\x00\x00\x00 text\n")
    with pytest.raises(DataError, match=r"data\.txt:2: NUL byte"):
        load_documents(path)


def test_binary_data_is_one_line_for_every_command(random_moe, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.txt").write_text("plain text " * 50)
    binary_file(data / "blob.txt")
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], data)
    assert_one_line_error(run_cli(config, out), r"blob\.txt:1: not UTF-8 text")
    assert_no_output(tmp_path, out)
    assert_one_line_error(run_cli("eval", random_moe["legacy"], "--data", data), r"blob\.txt:1: not UTF-8")
    assert_one_line_error(run_cli("inspect", random_moe["legacy"], "--data", data), r"blob\.txt:1: not UTF-8")


# -- 3. dtypes checked at parse time -------------------------------------------------


@pytest.mark.parametrize("key, value", [("dtype", "int8"), ("out_dtype", "float64"), ("calibration.dtype", "int8")])
def test_unsupported_dtype_fails_at_parse(key, value, calib_dir, tmp_path):
    out = tmp_path / "out"
    # a model that does not exist: the dtype must be refused before the model is looked at
    config = edit_config(write_config(tmp_path / "c.yml", tmp_path / "no-model", calib_dir), **{key: value})
    result = run_cli(config, out)
    assert_one_line_error(
        result, rf"{re.escape(key)}: unsupported dtype '{value}' \(accepted: float32, float16, bfloat16\)"
    )
    assert "model not found" not in result.output
    assert_no_output(tmp_path, out)


def test_dtype_accepts_mergekits_torch_prefix():
    text = yaml.safe_dump(
        {
            "merge_method": "expert_uniform",
            "models": [{"model": "m"}],
            "dtype": "torch.bfloat16",
            "out_dtype": "float16",
            "calibration": {"dataset": "d", "dtype": "torch.float32"},
        }
    )
    config = Moe2DenseConfig.from_yaml(text)
    assert (config.dtype, config.out_dtype, config.calibration.dtype) == ("bfloat16", "float16", "float32")
    with pytest.raises(ConfigError, match="unsupported dtype 'torch.int8'"):
        Moe2DenseConfig.from_yaml(text.replace("torch.bfloat16", "torch.int8"))


# -- 4. pickle checkpoints -------------------------------------------------------------


def pickle_copy(source: Path, dest: Path, extra=None, shards: int = 1) -> Path:
    """`source` as a pickle checkpoint (pytorch_model.bin, or `shards` shards with an index),
    with `extra` added to the first shard's state dict."""
    from safetensors.torch import load_file

    dest.mkdir()
    for name in os.listdir(source):
        if not name.endswith(".safetensors"):
            (dest / name).write_bytes((source / name).read_bytes())
    state = load_file(source / "model.safetensors")
    names = sorted(state)
    if shards == 1:
        torch.save({**state, **(extra or {})}, dest / "pytorch_model.bin")
        return dest
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {name: state[name] for name in names[i::shards]}
        torch.save({**part, **(extra if i == 0 and extra else {})}, dest / file)
        weight_map.update(dict.fromkeys(part, file))
    (dest / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dest


class WritesMarker:
    """Unpickling this opens (creates) a file: what an unsafe loader would execute."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safe_pickle_checkpoint_still_converts_and_inspects(random_moe, calib_dir, tmp_path):
    moe = pickle_copy(random_moe["legacy"], tmp_path / "pickled")
    config = write_config(tmp_path / "c.yml", moe, calib_dir, method="expert_uniform")
    result = run_cli(config, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file()
    result = run_cli("inspect", moe)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("shards", [1, 2])
def test_unsafe_pickle_is_refused_in_one_line_with_a_working_conversion(shards, random_moe, calib_dir, tmp_path):
    marker = tmp_path / "code-ran"
    moe = pickle_copy(random_moe["legacy"], tmp_path / "unsafe", extra={"payload": WritesMarker(marker)}, shards=shards)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yml", moe, calib_dir, method="expert_uniform")
    for result in (run_cli(config, out), run_cli("inspect", moe)):
        assert_one_line_error(
            result,
            r"refused: this pickle-format checkpoint holds more than tensors.*convert it to safetensors: python -c",
        )
        assert not marker.exists(), "the pickle's code ran"
    assert_no_output(tmp_path, out)

    # the advice works: run the command it gives (trusting the file, as the message says)
    command = re.search(r'(python -c ".*")\s*$', run_cli(config, out).output.strip()).group(1)
    argv = shlex.split(command)
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    marker.unlink()  # unpickling with weights_only=False did open it: this is why it is refused
    result = run_cli(config, out, "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file()


def test_corrupt_pickle_is_one_line(random_moe, calib_dir, tmp_path):
    moe = pickle_copy(random_moe["legacy"], tmp_path / "pickled")
    shard = moe / "pytorch_model.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    config = write_config(tmp_path / "c.yml", moe, calib_dir, method="expert_uniform")
    assert_one_line_error(
        run_cli(config, tmp_path / "out"), r"pytorch_model\.bin: pickle-format checkpoint is truncated or corrupt"
    )
    assert_no_output(tmp_path, tmp_path / "out")
    assert_one_line_error(run_cli("inspect", moe), "truncated or corrupt")


def test_pickle_check_reads_no_tensor_data(random_moe, tmp_path, monkeypatch):
    """The up-front check must stay cheap: torch.load onto the meta device, restricted."""
    moe = pickle_copy(random_moe["legacy"], tmp_path / "pickled")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    from mergekit.common import ModelReference

    SourceModel.open(ModelReference.parse(str(moe)))
    assert calls and calls[0] == {"map_location": "meta", "weights_only": True}


# -- 5. report files checked before any model is loaded ---------------------------------


def fail_if_called(*args, **kwargs):
    raise AssertionError("a model was loaded before the output path was checked")


@pytest.mark.parametrize("where", ["missing-dir", "under-a-file", "a-directory"])
def test_eval_json_path_is_checked_first(where, random_moe, calib_dir, tmp_path, monkeypatch):
    import mergekit_moe2dense.perplexity as evaluate

    monkeypatch.setattr(evaluate, "evaluate_models", fail_if_called)
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    path, fragment = {
        "missing-dir": (tmp_path / "nowhere" / "ppl.json", "does not exist"),
        "under-a-file": (tmp_path / "file" / "ppl.json", "does not exist"),
        "a-directory": (tmp_path / "dir", "is a directory"),  # click's own check
    }[where]
    result = run_cli("eval", random_moe["legacy"], "--data", calib_dir, "--json", path)
    assert_one_line_error(result, rf"{re.escape(str(path))}.*{fragment}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_report_files_in_read_only_directory(random_moe, calib_dir, tmp_path, monkeypatch):
    import mergekit_moe2dense.perplexity as evaluate

    monkeypatch.setattr(evaluate, "evaluate_models", fail_if_called)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_cli("eval", random_moe["legacy"], "--data", calib_dir, "--json", locked / "ppl.json")
        assert_one_line_error(result, "cannot write in")
        assert_one_line_error(run_cli("inspect", random_moe["legacy"], "--json", locked / "r.json"), "cannot write in")
    finally:
        locked.chmod(0o755)


def test_check_report_file_probes_by_creating_a_file(tmp_path, monkeypatch):
    """The probe is what catches read-only mounts and root-owned directories: a failing
    create is refused, and a successful one leaves nothing behind."""
    import tempfile

    from mergekit_moe2dense.report_files import ReportFileError, check_report_file

    check_report_file(str(tmp_path / "r.json"), "JSON output")
    assert list(tmp_path.iterdir()) == []

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ReportFileError, match="cannot write in .* \\(Read-only file system\\)"):
        check_report_file(str(tmp_path / "r.json"), "JSON output")


def test_inspect_report_paths_are_checked_first(random_moe, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(
        run_cli("inspect", random_moe["legacy"], "--json", tmp_path / "file" / "r.json"), "does not exist"
    )
    assert_one_line_error(run_cli("inspect", random_moe["legacy"], "--heatmap", tmp_path), "is a directory")


# -- 6. Ctrl-C ------------------------------------------------------------------------


def test_interrupt_during_a_command_is_one_line_and_130(random_moe, calib_dir, tmp_path, monkeypatch):
    import mergekit_moe2dense.build as build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_dense", interrupted)
    result = run_cli(write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir), tmp_path / "out")
    assert result.exit_code == 130, result.output
    assert result.output.strip() == "Error: interrupted"


def test_interrupt_while_the_merge_command_imports_is_one_line_and_130(monkeypatch):
    """Building `merge` imports mergekit and torch: an interrupt there is caught too."""

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.delitem(cli.main.commands, "merge", raising=False)
    monkeypatch.setattr(cli, "merge_command", interrupted)
    for args in (["config.yml", "out"], ["--help"]):
        result = run_cli(*args)
        assert result.exit_code == 130, result.output
        assert result.output.strip() == "Error: interrupted"


def test_cli_module_imports_neither_torch_nor_mergekit():
    """What the console script imports before its handler is in place must be quick."""
    code = "import sys, mergekit_moe2dense.cli; print(sorted(m for m in ('torch', 'mergekit', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_sigint_during_startup_imports(random_moe, calib_dir, tmp_path):
    """The console script, interrupted while torch is still loading: status 130, one line."""
    config = write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir)
    out = tmp_path / "out"
    child = subprocess.Popen(  # -X importtime: each finished import is a line on stderr
        [sys.executable, "-X", "importtime", str(BIN / "mergekit-moe2dense"), str(config), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not inherited as ignored
    )
    try:
        lines = []
        for line in child.stderr:  # wait until our entry module is in: from then on we promise
            lines.append(line)
            if line.rstrip().endswith("| mergekit_moe2dense.cli"):
                break
        child.send_signal(signal.SIGINT)
        stderr = "".join(lines) + child.stderr.read()
        child.wait(timeout=120)
    finally:
        child.kill()
    messages = [line for line in stderr.splitlines() if not line.startswith("import time:")]
    assert child.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert [m for m in messages if m.strip()] == ["Error: interrupted"]
    # it was during the start-up imports: torch never finished importing
    assert not re.search(r"\|\s+torch$", stderr, re.MULTILINE)
    assert_no_output(tmp_path, out)


def test_sigint_between_import_and_main_is_one_line():
    """The console script's wrapper runs a few lines between importing the CLI and calling it."""
    script = (
        "import os, signal, sys, time\n"
        "sys.argv = ['mergekit-moe2dense']\n"
        "import mergekit_moe2dense.cli\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "Error: interrupted"


def test_importing_the_cli_elsewhere_keeps_pythons_interrupt_handler():
    script = "import signal\nimport mergekit_moe2dense.cli\nprint(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr


# -- 7. calibration / evaluation windows longer than the model's positions -------------


def test_seq_len_beyond_positions_is_refused_before_calibration(random_moe, calib_dir, tmp_path, monkeypatch):
    import mergekit_moe2dense.build as build
    import mergekit_moe2dense.job as job

    monkeypatch.setattr(build, "calibrate", fail_if_called)
    monkeypatch.setattr(job, "load_calibration_batches", fail_if_called)
    out = tmp_path / "out"
    config = edit_config(
        write_config(tmp_path / "c.yml", random_moe["legacy"], calib_dir), **{"calibration.seq_len": 300}
    )
    assert_one_line_error(
        run_cli(config, out), "calibration.seq_len 300 is more than the model's max_position_embeddings 256"
    )
    assert_no_output(tmp_path, out)


def test_check_seq_len_limits():
    from mergekit_moe2dense.config import CalibrationConfig

    class Model:
        max_position_embeddings = 256

    check_seq_len(CalibrationConfig(dataset="d", seq_len=256), Model())  # exactly the limit is fine
    check_seq_len(None, Model())  # nothing to calibrate
    check_seq_len(CalibrationConfig(dataset="d", seq_len=4096), object())  # a config without the field
    with pytest.raises(ConfigError, match="257 .* 256"):
        check_seq_len(CalibrationConfig(dataset="d", seq_len=257), Model())


def test_eval_and_inspect_seq_len_beyond_positions(random_moe, calib_dir, tmp_path, monkeypatch):
    import mergekit_moe2dense.perplexity as evaluate

    monkeypatch.setattr(evaluate.AutoModelForCausalLM, "from_pretrained", fail_if_called)
    result = run_cli("eval", random_moe["legacy"], "--data", calib_dir, "--seq-len", 512)
    assert_one_line_error(result, "--seq-len 512 is more than the max_position_embeddings 256")
    result = run_cli("inspect", random_moe["legacy"], "--data", calib_dir, "--seq-len", 512)
    assert_one_line_error(result, "--seq-len 512 is more than the model's max_position_embeddings 256")


def test_eval_checks_every_model_before_scoring_the_first(random_moe, calib_dir, tmp_path, monkeypatch):
    import mergekit_moe2dense.perplexity as evaluate

    monkeypatch.setattr(evaluate.AutoModelForCausalLM, "from_pretrained", fail_if_called)
    result = run_cli("eval", random_moe["legacy"], tmp_path / "second", "--data", calib_dir, "--seq-len", 32)
    assert_one_line_error(result, "model directory not found")
