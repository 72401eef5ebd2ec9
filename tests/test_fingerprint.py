# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The content fingerprint that reused files check, and the device check of every command."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_moe2dense.devices import DeviceError, check_device
from mergekit_moe2dense.io.fingerprint import FingerprintError, content_fingerprint


@pytest.fixture
def moe(random_moe):
    return random_moe["fused"]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensor(model_dir, select, edit):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = next(n for n in sorted(tensors) if select(n))
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


def test_same_weights_same_fingerprint_whatever_the_path_or_version_stamp(moe, tmp_path):
    copy = _copy(moe, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (copy / "config.json").write_text(json.dumps(config, indent=4))
    assert content_fingerprint(str(copy)) == content_fingerprint(str(moe))


def test_resharding_keeps_the_fingerprint(moe, tmp_path):
    copy = _copy(moe, tmp_path / "copy")
    tensors = load_file(str(copy / "model.safetensors"))
    names = sorted(tensors)
    (copy / "model.safetensors").unlink()
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(copy / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(copy / "model-00002-of-00002.safetensors"))
    assert content_fingerprint(str(copy)) == content_fingerprint(str(moe))


@pytest.mark.parametrize(
    "select, edit",
    [
        (lambda n: "experts" in n, lambda t: torch.randn_like(t)),  # other experts, same routers
        (lambda n: "embed_tokens" in n, lambda t: t.flip(0)),  # rows permuted
        (lambda n: "experts" in n, lambda t: t.to(torch.float16)),  # another dtype
    ],
    ids=["experts", "permuted", "dtype"],
)
def test_other_weights_change_the_fingerprint(moe, tmp_path, select, edit):
    copy = _copy(moe, tmp_path / "copy")
    _edit_tensor(copy, select, edit)
    assert content_fingerprint(str(copy)) != content_fingerprint(str(moe))


def test_config_change_changes_the_fingerprint(moe, tmp_path):
    copy = _copy(moe, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["rope_theta"] = 1234.0
    (copy / "config.json").write_text(json.dumps(config))
    assert content_fingerprint(str(copy)) != content_fingerprint(str(moe))


def test_no_weights_or_truncated_shard_is_one_error(moe, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FingerprintError, match="holds no weights"):
        content_fingerprint(str(empty))
    copy = _copy(moe, tmp_path / "copy")
    shard = copy / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(FingerprintError, match="truncated"):
        content_fingerprint(str(copy))


def test_cpu_is_accepted():
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused(device):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        check_device(device)


@pytest.mark.parametrize("device", ["tpu", "gpu0", ""])
def test_unknown_device_is_refused(device):
    with pytest.raises(DeviceError, match="not a device torch knows"):
        check_device(device)
