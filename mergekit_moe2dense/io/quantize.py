# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Quantizers for the two formats the reader dequantizes, so that a smaller MoE of a quantized
source is written in the source's format: each is the inverse of transformers' dequantization.

- Block-wise FP8 (DeepSeek-V3, Qwen3 FP8): per block of b0 x b1 values of the last two dims (the
  last block of a dim may be partial), `weight_scale_inv` s = amax / 448 and the e4m3 weight
  clamp(W * 448 / amax). The arithmetic is transformers' `Fp8Quantize` (the reverse of its loading
  op), which takes whole blocks only; `ue8m0` rounds s up to a power of two first (DeepSeek-V3.1's
  `scale_fmt`). transformers' `_dequantize_fp8_weight` gives back W' = q * s, with
  |W' - W| <= 2**-4 |W| + 2**-10 s (3 mantissa bits; the subnormal spacing 2**-9 s).
- MXFP4 (OCP microscaling, GPT-OSS's experts): per 32 consecutive inputs of one output, a shared
  power-of-two scale 2**e stored as e + 127 (e8m0) and 32 E2M1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6
  and their negatives) packed two a byte, the even element in the low nibble. e = ceil(log2(amax /
  6)), so the group's largest magnitude maps to at most 6 and nothing clips (the scale rounding of
  triton_kernels' `downcast_to_mxfp`, which GPT-OSS's kernels use); values round to nearest, ties
  to the even code. transformers' `convert_moe_packed_tensors` gives back W' with |W' - W| <= 2**e.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FP8_MAX", "QuantizedFormat", "fp8_block_quantize", "mxfp4_quantize", "quantized_names"]

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
MXFP4_GROUP = 32
# The E2M1 magnitudes' rounding thresholds: a magnitude above (or, where the upper neighbour's code
# is the even one, at) threshold i is at least code i + 1; ties go to the even code.
_E2M1_UPPER = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (False, True, False, True, False, True, False)


def fp8_block_quantize(
    weight: torch.Tensor,
    block: tuple[int, int] | None,
    scale_dtype: torch.dtype = torch.float32,
    power_of_two: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, weight_scale_inv) of `weight` [..., rows, cols]: one scale per block of the last
    two dims ([..., ceil(rows / b0), ceil(cols / b1)]), or one for the whole tensor (shape []) when
    `block` is None. Scales are stored in `scale_dtype`; an e8m0 dtype or `power_of_two` rounds
    them up to powers of two, and the weight is divided by the scale as stored."""
    value = weight.float()
    rows, cols = value.shape[-2:]
    b0, b1 = block if block is not None else (rows, cols)
    padded = torch.nn.functional.pad(value, (0, -cols % b1, 0, -rows % b0))  # zeros: no change to amax
    grid = padded.unflatten(-1, (-1, b1)).unflatten(-3, (-1, b0))  # [..., R, b0, C, b1]
    amax = grid.abs().amax(dim=(-3, -1))
    scales = torch.where(amax > 0, FP8_MAX / amax.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    inverse = (1.0 / scales).float()
    if power_of_two or scale_dtype == getattr(torch, "float8_e8m0fnu", None):
        inverse = torch.exp2(torch.ceil(torch.log2(inverse.clamp_min(torch.finfo(torch.float32).tiny))))
        scales = 1.0 / inverse
    stored = inverse.to(scale_dtype)
    if scale_dtype != torch.float32:  # divide by the scale as it is stored
        scales = 1.0 / stored.float()
    quantized = (grid * scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    quantized = quantized.flatten(-2).flatten(-3, -2)[..., :rows, :cols].contiguous()
    if block is None:
        stored = stored.reshape(weight.shape[:-2])
    return quantized, stored


def mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of `weight` [..., in, out] (transformers' in-memory GPT-OSS experts, `in` a
    multiple of 32): blocks [..., out, in/32, 16] uint8 and scales [..., out, in/32] uint8, as GPT-OSS
    stores `*_blocks` and `*_scales`."""
    if weight.shape[-2] % MXFP4_GROUP:
        raise ValueError(f"MXFP4 needs a multiple of {MXFP4_GROUP} inputs, got {weight.shape[-2]}")
    groups = weight.float().transpose(-1, -2).unflatten(-1, (-1, MXFP4_GROUP))  # [..., out, G, 32]
    amax = groups.abs().amax(-1, keepdim=True)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    exponent = torch.where(amax > 0, exponent, -127.0)
    exponent = exponent + (amax > 6.0 * torch.exp2(exponent)).float()  # amax / 6 rounded down: one more
    exponent = exponent.clamp(-127, 127)
    magnitude = torch.ldexp(groups.abs(), -exponent.to(torch.int32))
    codes = torch.zeros_like(magnitude, dtype=torch.uint8)
    for threshold, tie_up in zip(_E2M1_UPPER, _TIES_UP):
        codes += (magnitude >= threshold if tie_up else magnitude > threshold).to(torch.uint8)
    codes |= torch.signbit(groups).to(torch.uint8) << 3
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exponent[..., 0] + 127).to(torch.uint8).contiguous()


@dataclass(frozen=True)
class QuantizedFormat:
    """How an output tensor is quantized: `fp8` (its `block`, the scales' dtype by name, `ue8m0`
    power-of-two scales) or `mxfp4`."""

    kind: str
    block: tuple[int, int] | None = None
    scale_dtype: str = "float32"
    ue8m0: bool = False

    def quantize(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(data, scales) of `value` (as the model holds it: [..., out, in] for FP8, [..., in, out] for MXFP4)."""
        if self.kind == "fp8":
            return fp8_block_quantize(value, self.block, getattr(torch, self.scale_dtype), self.ue8m0)
        return mxfp4_quantize(value)

    def scale_rows(self, rows: tuple[int, int] | None, total: int) -> tuple[int, int] | None | bool:
        """The scale rows of FP8 data rows `rows` (of `total`), None for all of them, or False
        where the range does not start and end on block boundaries (its bytes cannot be copied)."""
        if rows is None:
            return None
        if self.kind != "fp8" or self.block is None:
            return False
        first, last = rows
        size = self.block[0]
        if first % size or (last % size and last != total):
            return False
        return first // size, -(-last // size)


def quantized_names(kind: str, name: str) -> tuple[str, str]:
    """The stored names of a tensor's data and scales in a checkpoint of format `kind`."""
    if kind == "fp8":
        return name, name + "_scale_inv"
    return name + "_blocks", name + "_scales"
