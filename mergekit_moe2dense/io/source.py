# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The source MoE: where it is, its config and family, and where every tensor lives.

`SourceModel.open` finds the model (a local directory, or mergekit's download of a hub id),
reads its config (refusing remote code), picks the family adapter, indexes its tensors and runs
every check that needs no tensor data (`checks.py`) before any work starts.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import transformers
from mergekit.common import ModelReference

from mergekit_moe2dense.families import MoEFamily, MoELayer, TextPart, get_family, text_model_config, text_part
from mergekit_moe2dense.io import CheckpointError
from mergekit_moe2dense.io.checks import check_quantized, check_shapes, check_shards
from mergekit_moe2dense.io.fingerprint import content_fingerprint
from mergekit_moe2dense.io.index import SourceIndex, read_index, read_raw_config
from mergekit_moe2dense.io.reader import TensorReader

__all__ = ["SourceModel", "local_model_path"]

LOG = logging.getLogger(__name__)


@dataclass
class SourceModel:
    """The MoE to convert: config, family adapter, and where every tensor lives.

    For a multimodal checkpoint whose text model converts (`families.TEXT_PARTS`), that text
    model: `config` is its `text_config` and the index names its tensors as the text-only
    class does (`read_index`); `text_part` says where they are stored."""

    reference: ModelReference
    path: str
    config: transformers.PretrainedConfig
    family: MoEFamily
    index: SourceIndex
    text_part: TextPart | None = None

    @classmethod
    def open(cls, reference: ModelReference, trust_remote_code: bool = False) -> SourceModel:
        path = local_model_path(reference)
        config = _read_config(path, trust_remote_code)
        family = get_family(config)
        part = text_part(config.model_type)
        if part is not None and part.multimodal:
            config = text_model_config(config)
            LOG.warning(  # shown by default (mergekit's logging: WARNING): the output has no vision
                "%s is a multimodal %s checkpoint: its text model (%s) is what is read and converted; %s is left out",
                path,
                part.model_type,
                config.model_type,
                part.dropped,
            )
        index = read_index(path)
        check_shards(index)
        check_quantized(index)
        check_shapes(config, family, index)
        return cls(reference, path, config, family, index, part)

    @functools.cached_property
    def reader(self) -> TensorReader:
        return TensorReader(self.index)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.index.tensor_paths)

    def rest_of_checkpoint(self, consumed: set[str]) -> list[str]:
        """The tensors every output copies unchanged: all but `consumed` (the converted blocks'),
        less the stored tensors that are not part of the model (`family.unbuilt_tensors`).

        Those are DeepSeek-V3's and GLM-4.5's multi-token-prediction layers: no output carries
        them (and its config says so, `outputs.base.write_model_files`) rather than converting
        them too: transformers ignores them on load and vLLM's MTP speculative decoding is
        opt-in, while converting their experts as the other layers' would need statistics of
        layers that no calibration pass runs through."""
        unbuilt = self.family.unbuilt_tensors(self.config, self.tensor_names)
        return [name for name in self.tensor_names if name not in consumed and name not in unbuilt]

    def moe_layers(self) -> list[MoELayer]:
        names = set(self.index.tensor_paths)
        return [
            self.family.resolve_layer(self.config, layer, names) for layer in self.family.moe_layer_indices(self.config)
        ]

    def fingerprint(self, layers: list[MoELayer]) -> dict[str, Any]:
        """What statistics recorded on this model are checked against (`RouterStatistics.check_model`).

        The statistics depend on the routers, the experts (their outputs feed the next layers)
        and everything upstream of them (embeddings, attention, norms), so the weights are
        identified by `content_fingerprint`, which samples every tensor; for a multimodal
        checkpoint that includes the vision tower, which the text model's statistics do not
        depend on: a vision-only change refuses them too (recalibrating is the cost, not a wrong
        result). The readable fields let a refusal say what differs."""
        return {
            "model_type": self.config.model_type,
            "layers": [layer.index for layer in layers],
            "num_experts": layers[0].num_experts if layers else 0,
            "content_sha256": content_fingerprint(self.path),
        }


def local_model_path(reference: ModelReference) -> str:
    """The model's directory: the local path, or mergekit's download of a hub id.

    mergekit sends every path that does not exist to the hub, where a local path
    fails with a repo-id validation traceback and an unreachable hub with a network
    one; both become one line naming the path.
    """
    if reference.lora is not None:  # mergekit's local_path() asserts on one
        raise CheckpointError(f"{reference}: a model+LoRA reference is not supported; merge the LoRA first")
    path = reference.model.path
    if not os.path.exists(path):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(path)
        except HFValidationError:  # not a hub id: a local path
            raise CheckpointError(f"model not found: no such directory {path}") from None
        try:
            path = reference.local_path()
        except Exception as error:  # hub, HTTP, offline-mode and OS errors alike
            reason = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise CheckpointError(
                f"model not found: {path} is not a local directory, and the Hugging Face hub "
                f"could not provide it ({reason})"
            ) from None
    if not os.path.isdir(path):
        raise CheckpointError(f"model not found: {path} is not a directory")
    return path


def _read_config(path: str, trust_remote_code: bool) -> transformers.PretrainedConfig:
    """The model's config.json, read by transformers; a config naming remote code (`auto_map`)
    that transformers cannot read natively is refused by the family check, naming it."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json")
    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as error:
        raw = read_raw_config(path)
        if raw.get("auto_map"):
            get_family(transformers.PretrainedConfig(**raw))  # raises the family/remote-code error
        raise CheckpointError(f"{path}: cannot read config.json ({error})") from None
