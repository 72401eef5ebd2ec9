# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The base of the typed settings that `heal`, `collapse`, `inspect` and `eval` take, as the
conversion takes its `Moe2DenseConfig`.

A settings model is frozen and strict (`extra="forbid"`: a misspelt setting is an error, never
silently dropped), and a bad value fails when the settings are made, before any model is
loaded. The failure is the command's own `Moe2DenseError` subclass (`Settings.error`) with one
line saying what to change, so a caller catches one kind of error and the command line prints
one line. This module imports only pydantic, so any module can define settings.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = ["PathName", "Settings", "SettingsError", "at_least", "first_problem"]

# A local path (str or os.PathLike, kept as a string) or a datasets name
PathName = Annotated[str, BeforeValidator(lambda value: os.fspath(value) if isinstance(value, os.PathLike) else value)]


class SettingsError(Moe2DenseError, ValueError):
    """Settings that do not validate (the error of a settings model that names none of its own)."""


class Settings(BaseModel):
    """Frozen, strict settings whose validation errors are `error`, in one line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    error: ClassVar[type[Moe2DenseError]] = SettingsError

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise type(self).error(first_problem(error)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):
        """Settings from a mapping (a parsed YAML or JSON file), failing as `__init__` does."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as error:
            raise cls.error(first_problem(error)) from None


def first_problem(error: ValidationError) -> str:
    """The first problem pydantic found, in one line. A validator of ours raises a message that
    is whole already; pydantic's own checks (type, unknown key, choice) get the setting's name
    and the value given."""
    first = error.errors()[0]
    message = first["msg"]
    if first["type"] == "value_error":
        return message.removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    where = ".".join(str(part) for part in first["loc"]) or "settings"
    if first["type"] == "missing":
        return f"{where}: {message}"
    return f"{where}: {message} (got {first['input']!r})"


def at_least(value: int | None, minimum: int, flag: str) -> int | None:
    """`value` if it is None or at least `minimum`; otherwise the message naming `flag`."""
    if value is not None and value < minimum:
        raise ValueError(f"{flag} must be at least {minimum}, got {value}")
    return value
