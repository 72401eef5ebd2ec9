# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The YAML config: mergekit's schema plus a `calibration:` block.

Unlike mergekit's own config, unknown keys are errors (`extra="forbid"`): a
misspelt option must not be silently ignored on a multi-hour run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from mergekit.common import ModelReference
from mergekit.config import ParameterSetting
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from mergekit_moe2dense.errors import Moe2DenseError


class ConfigError(Moe2DenseError, ValueError):
    """The YAML config is malformed."""


DTYPES = ("float32", "float16", "bfloat16")


def dtype_name(value: str) -> str:
    """One of DTYPES; mergekit's `torch.` prefix is accepted and dropped.

    Checked at parse time: mergekit's own lookup fails on anything else only when the
    first tensor is cast, after calibration.
    """
    name = value[len("torch.") :] if value.startswith("torch.") else value
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {value!r} (accepted: {', '.join(DTYPES)})")
    return name


DType = Annotated[str, AfterValidator(dtype_name)]

# what an output's tensors are written in (outputs.base.output_quantization): the source's format
# (MoE outputs), dequantized, or block-wise FP8 (dense outputs)
OutputQuantization = Literal["source", "none", "fp8"]

# accelerate's placement strategies, or an explicit {module name: device} map
DeviceMap = Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str]


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(description=".txt/.jsonl/.parquet file, a directory of them, or a datasets name")
    num_samples: int = Field(128, gt=0)
    seq_len: int = Field(512, gt=1)
    batch_size: int = Field(4, gt=0)
    seed: int = 0
    text_field: str = "text"
    split: str = "train"
    max_token_samples: int = Field(16384, ge=0, description="per-token router vectors kept per layer")
    record_router_inputs: bool = Field(
        False, description="also keep the routers' inputs of the sampled tokens (L x N x hidden floats)"
    )
    dtype: DType | None = Field(
        None, description="dtype of the calibration forward (default: float32 on CPU, bfloat16 on GPU)"
    )
    engine: Literal["auto", "full", "layerwise"] = Field(
        "auto",
        description="full: the whole model in memory; layerwise: streamed from the checkpoint one "
        "decoder layer at a time; auto: full when the checkpoint fits in half the free memory",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="layer-streamed passes (engine: layerwise, the re-fits): dtype of each streamed layer's weights "
        "and arithmetic, the carried activations staying in dtype; auto: float32 when dtype is 16-bit on a CPU "
        "without native matmuls in it (faster there, and closer to float32), else dtype",
    )
    spill_dir: str | None = Field(
        None, description="layerwise engine: keep the carried activations on disk under this directory"
    )
    device_map: DeviceMap | None = Field(
        None,
        description="full engine: let accelerate place the model (every visible GPU, then CPU RAM) "
        "instead of putting it all on --device; for a model that no single device holds",
    )


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelReference
    parameters: dict[str, ParameterSetting] | None = None


class Moe2DenseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_method: str
    models: list[InputModel]
    parameters: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationConfig | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    output_quantization: OutputQuantization | None = Field(
        None,
        description="source: the tensors a block-wise FP8 or MXFP4 source stores quantized are written in its "
        "format (kept ones bit for bit, merged ones quantized); none: every tensor dequantized, in out_dtype; "
        "default: source for an MoE output (a smaller MoE, kmeans_multi_dense's output: moe), none for dense ones; "
        "fp8 (any source): the decoder layers' linear weights (and a smaller MoE's experts) in float8_e4m3fn "
        "with a scale per block of output_block_size",
    )
    output_block_size: tuple[PositiveInt, PositiveInt] | None = Field(
        None,
        description="output_quantization: fp8: the [rows, columns] of a weight block with one scale (default [128, 128])",
    )

    @field_validator("models")
    @classmethod
    def _one_model(cls, models):
        if len(models) != 1:
            raise ValueError(f"give exactly one MoE under models: (got {len(models)})")
        return models

    @property
    def model(self) -> ModelReference:
        return self.models[0].model

    @property
    def method_parameters(self) -> dict[str, Any]:
        """Top-level parameters, overridden by the model entry's own."""
        return {**self.parameters, **(self.models[0].parameters or {})}

    @classmethod
    def from_yaml(cls, text: str, source: str = "config") -> Moe2DenseConfig:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{source}: not valid YAML ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "config"
            message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators
            raise ConfigError(f"{source}: {where}: {message}") from None

    @classmethod
    def from_file(cls, path: str) -> Moe2DenseConfig:
        return cls.from_yaml(read_config_text(path), source=path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def read_config_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file not found: {path}") from None


def check_seq_len(calibration: CalibrationConfig | None, model_config, option: str = "calibration.seq_len") -> None:
    """Refuses calibration sequences longer than the model has positions for.

    Longer sequences run without an error in most families and calibrate the
    routers on positions the model never saw; `option` names the setting in the message.
    """
    if calibration is None:
        return
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and calibration.seq_len > limit:
        raise ConfigError(
            f"{option} {calibration.seq_len} is more than the model's max_position_embeddings {limit}; "
            f"lower {option} to at most {limit}"
        )
