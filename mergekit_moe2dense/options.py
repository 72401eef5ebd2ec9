# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit's merge options (`add_merge_options`): each one honoured, or refused.

The CLI accepts every mergekit flag so that configs and habits carry over; an
option this tool does not act on must not be silently ignored, so a non-default
value of one of those fails before any work with the reason (and `merge --help` hides it).
Importing this module loads neither mergekit nor torch: the command line reads `REFUSED` to
draw its help.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_moe2dense.errors import Moe2DenseError

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

__all__ = ["HONOURED", "REFUSED", "OptionError", "check_options"]


class OptionError(Moe2DenseError, ValueError):
    """A mergekit option this tool cannot act on was set."""


# Where each honoured option takes effect.
HONOURED = {
    "cuda": "merge arithmetic on the GPU (as --device cuda)",
    "device": "merge arithmetic, calibration forward and re-fit on this device",
    "low_cpu_memory": "intermediate merge results stay on the device",
    "out_shard_size": "output shard size",
    "copy_tokenizer": "tokenizer and generation files copied from the MoE",
    "clone_tensors": "tensors cloned before saving",
    "trust_remote_code": "passed to transformers when the config is read (remote-code models are still refused)",
    "random_seed": "seeds torch, numpy and random (the calibration has its own `seed`)",
    "num_threads": "torch's CPU threads",
    "write_model_card": "README.md model card",
    "safe_serialization": "safetensors output (else pickle)",
    "verbosity": "log level",
    "quiet": "no progress bars",
    "async_write": "pickle output: shards written by background threads (safetensors is always written as it comes)",
    "write_threads": "threads of async_write (pickle output)",
    "lazy_unpickle": "pickle checkpoints are always read lazily",
    "transformers_cache": "where hub models are downloaded to",
}

# Option -> why it is refused when set.
REFUSED = {
    "allow_crimes": "one model goes in, so there are no architectures to mix",
    "unsafe_truncate_embeddings": "one model goes in, so there are no vocabularies to reconcile",
    "lora_merge_cache": "there are no LoRA adapters in an MoE-to-dense conversion",
    "lora_merge_dtype": "there are no LoRA adapters in an MoE-to-dense conversion",
    # before multi_gpu and read_to_gpu, which mergekit sets from it
    "gpu_rich": "it implies --multi-gpu: use --cuda --low-cpu-memory, and torchrun for several GPUs",
    "multi_gpu": "the merge runs on one device (--cuda); run the calibration on several GPUs under torchrun",
    "read_to_gpu": "tensors are read through the page cache and moved to --device by the merge itself",
}


def check_options(options: MergeOptions) -> None:
    """Raises on the first refused option set to a non-default value."""
    from mergekit.options import MergeOptions

    defaults = MergeOptions()
    for name, reason in REFUSED.items():
        if getattr(options, name) != getattr(defaults, name):
            flag = "--" + name.replace("_", "-")
            raise OptionError(f"{flag} is not supported by mergekit-moe2dense: {reason}")
