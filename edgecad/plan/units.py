"""Sizes as the user writes them: "1.5GB", "900MiB", "40%" (of the model files), "auto"."""
from __future__ import annotations

import math
import re
from typing import Callable, Optional, Union

from ..errors import EdgecadError

MB = 1_000_000
MiB = 1 << 20
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": MiB,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30}


def mb(n: float) -> str:
    """Bytes as whole megabytes, as the plan's lines and errors say them: "1,234 MB"."""
    return f"{n / MB:,.0f} MB"


def parse_size(s: str) -> Optional[int]:
    """Bytes of a size such as "450MB", "1.5GiB", "2k" or "123"; None when `s` is not a size."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", s.strip().lower())
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m and m.group(2) in _UNITS else None


def parse_memory(value: Union[int, float, str], model_bytes: int, auto: Optional[Callable[[], int]] = None) -> int:
    """Bytes of the engine's budget: an int, "1.5GB", "900MiB", "40%" (of the model files, draft +
    target), or "auto" (what `auto()` measures: edgecad.measure.auto_budget)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        s = str(value).strip().lower()
        n = -1
        if s == "auto" and auto is not None:
            n = auto()
        elif s.endswith("%"):
            try:
                pct = float(s[:-1])
                n = int(model_bytes * pct / 100) if 0 < pct and math.isfinite(pct) else -1
            except ValueError:
                pass
        else:
            n = parse_size(s)
        if n is None or n == -1:
            raise EdgecadError(f"cannot read memory budget {value!r}: give bytes, a size such as '1.5GB' or "
                               "'900MiB', a share of the model files such as '60%'"
                               + (", or 'auto'" if auto is not None else ""))
    if n <= 0:
        raise EdgecadError(f"memory budget {value!r} is not positive: give a size such as '1.5GB'"
                           + (" or 'auto'" if auto is not None else ""))
    return n


def parse_budget(value: Union[int, float, str, None], file_size: int,
                 auto: Optional[Callable[[], int]] = None) -> Optional[int]:
    """Bytes of the target that may be resident (target_budget): what parse_memory reads, a share such as "40%"
    being of the target file. None = no budget."""
    return None if value is None else parse_memory(value, file_size, auto)
