"""One conversion of Python/numpy/JAX values to JSON values, for checkpoint metadata and
experiment records alike."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["to_jsonable"]


def to_jsonable(value: Any, *, nonfinite_as_none: bool = True) -> Any:
    """``value`` as something ``json.dumps`` writes faithfully.

    Mappings become dicts with string keys, sequences and arrays lists, numpy scalars and
    0-d arrays Python numbers; non-finite floats become None (JSON has no NaN) unless
    ``nonfinite_as_none=False``; anything else (a dtype, a function) its ``repr``.
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return None if nonfinite_as_none and not math.isfinite(number) else number
    if isinstance(value, Mapping):
        return {
            str(k): to_jsonable(v, nonfinite_as_none=nonfinite_as_none) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, nonfinite_as_none=nonfinite_as_none) for v in value]
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("jax"):
        if hasattr(value, "tolist") and getattr(value, "dtype", None) is not None:
            try:
                return to_jsonable(np.asarray(value).tolist(), nonfinite_as_none=nonfinite_as_none)
            except TypeError:  # a PRNG key array or another array without a numpy form
                pass
    return repr(value)


def read_format_file(
    path: str, expected_format: str | tuple[str, ...], *, name: str, missing: str
) -> dict:
    """The JSON object in ``path`` whose ``"format"`` is ``expected_format`` (or one of them).

    Raises:
      FileNotFoundError: no file at ``path`` (the message names ``name`` and ``missing``:
        how such a file is written).
      ValueError: the file is not JSON (truncated, corrupted: the message names the file,
        which json's own error does not) or not a JSON object of that format.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: {missing}")
    formats = (expected_format,) if isinstance(expected_format, str) else tuple(expected_format)
    try:
        with open(path, encoding="utf-8") as stream:
            content = json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{name}: {path!r} is not valid JSON, the file is truncated or corrupted ({error})"
        ) from error
    if not isinstance(content, dict) or content.get("format") not in formats:
        expected = repr(formats[0]) if len(formats) == 1 else f"one of {formats}"
        raise ValueError(f"{name}: {path!r} is not a file of format {expected}")
    return content
