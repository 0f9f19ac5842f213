"""Search spaces: how one hyperparameter maps between its own values and CARBS's "basic" space.

CARBS searches in a *basic* space where a step of a given size means roughly
the same thing for every parameter: a learning rate is searched in decades
(``LogSpace``), a dropout rate in decades of odds (``LogitSpace``), a
warm-up fraction linearly (``LinearSpace``). ``scale`` stretches one basic unit
(``basic = transform(value) / scale``), so with the default search radius of
0.3 basic units a ``LogSpace(scale=1)`` parameter moves by about a factor of
two per step.

Integer parameters are rounded in *param* space (to a multiple of
``rounding_factor``) and mapped back, so candidates that round to the same
integer land on the same basic point and are grouped as repeats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
from scipy.special import expit

__all__ = [
    "LinearSpace",
    "LogSpace",
    "LogitSpace",
    "Param",
    "ParamDictType",
    "ParamType",
    "RealNumberSpace",
    "decode_float",
    "encode_float",
    "space_from_dict",
]

ParamType = int | float | str
ParamDictType = dict[str, ParamType]

# Integers are bounded a little outside [min, max]: the bound check is strict,
# and a float bound exactly on an integer would otherwise exclude it.
_INTEGER_BOUND_SLACK = 0.1


def encode_float(x: float) -> float | str:
    """A float for JSON: finite values as numbers, inf/nan as strings (strict JSON has no Infinity)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def decode_float(x: float | str) -> float:
    """Inverse of `encode_float` (``float("inf")`` parses the strings)."""
    return float(x)


@dataclass(frozen=True)
class RealNumberSpace:
    """A real (or integer) parameter; subclasses define the map to basic space."""

    min: float = float("-inf")
    """Smallest allowed value in param space (suggestions stay strictly above it, integers may equal it)."""
    max: float = float("inf")
    """Largest allowed value in param space."""
    scale: float = 1.0
    """One basic unit equals `scale` units of the transformed value (larger = coarser search)."""
    is_integer: bool = False
    """Round suggestions to a multiple of `rounding_factor` in param space."""
    rounding_factor: int = 1
    """Integer suggestions are multiples of this (e.g. 8 for a width that must divide by 8)."""

    plot_scale: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"{type(self).__name__}: scale must be > 0, got {self.scale}")
        if not self.min < self.max:
            raise ValueError(f"{type(self).__name__}: need min < max, got min={self.min} max={self.max}")
        if self.rounding_factor < 1:
            raise ValueError(f"{type(self).__name__}: rounding_factor must be >= 1, got {self.rounding_factor}")

    # -- the map, scalar ------------------------------------------------------------------
    def _to_basic(self, value: float) -> float:
        raise NotImplementedError

    def _from_basic(self, value: float) -> float:
        raise NotImplementedError

    def basic_from_param(self, value: ParamType) -> float:
        """Map a parameter value to basic space."""
        if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{type(self).__name__} takes a real number, got {value!r}")
        return self._to_basic(float(value))

    def param_from_basic(self, value: float, is_rounded: bool = True) -> float | int:
        """Map a basic-space value back; integers are rounded unless ``is_rounded=False``."""
        param = self._from_basic(float(value))
        if self.is_integer and is_rounded:
            return round(param / self.rounding_factor) * self.rounding_factor
        return param

    # -- bounds and rounding, vectorised over candidates ------------------------------------
    @property
    def min_bound(self) -> float:
        """Lower bound in param space used by the strict bound check."""
        return self.min - _INTEGER_BOUND_SLACK if self.is_integer else self.min

    @property
    def max_bound(self) -> float:
        """Upper bound in param space used by the strict bound check."""
        return self.max + _INTEGER_BOUND_SLACK if self.is_integer else self.max

    @property
    def min_bound_in_basic(self) -> float:
        return self._bound_to_basic(self.min_bound)

    @property
    def max_bound_in_basic(self) -> float:
        return self._bound_to_basic(self.max_bound)

    def _bound_to_basic(self, bound: float) -> float:
        return self._to_basic(bound)

    def round_basic(self, values: np.ndarray) -> np.ndarray:
        """Round basic-space values so that they map to integers (identity for real spaces)."""
        if not self.is_integer:
            return values
        out = np.array(values, dtype=float, copy=True)
        for i, v in enumerate(out.flat):
            if math.isfinite(v):
                out.flat[i] = self._to_basic(float(self.param_from_basic(v)))
        return out

    # the original library's name for the same operation
    round_tensor_in_basic = round_basic

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description, inverse of `space_from_dict`."""
        d: dict[str, Any] = {"type": type(self).__name__}
        for k, v in asdict(self).items():
            d[k] = encode_float(v) if isinstance(v, float) else v
        return d


@dataclass(frozen=True)
class LinearSpace(RealNumberSpace):
    """``basic = value / scale``. For integers use a `scale` of at least ~3 so that a 0.3 step can
    reach the neighbouring integer."""

    min: float = float("-inf")
    max: float = float("inf")

    def _to_basic(self, value: float) -> float:
        return value / self.scale

    def _from_basic(self, value: float) -> float:
        return value * self.scale


@dataclass(frozen=True)
class LogSpace(RealNumberSpace):
    """``basic = log_base(value) / scale``; for positive quantities such as a learning rate or a width."""

    min: float = 0.0
    max: float = float("inf")
    base: int = 10
    """Logarithm base (10: one basic unit is a decade; 2: an octave)."""

    plot_scale: ClassVar[str] = "log"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min < 0:
            raise ValueError(f"LogSpace: min must be >= 0, got {self.min}")
        if not self.base > 1:
            raise ValueError(f"LogSpace: base must be > 1, got {self.base}")

    def _to_basic(self, value: float) -> float:
        if value < 0:
            raise ValueError(f"LogSpace: value must be >= 0, got {value}")
        if value == 0:
            return float("-inf")
        return math.log(value) / math.log(self.base) / self.scale

    def _from_basic(self, value: float) -> float:
        exponent = value * self.scale * math.log(self.base)
        return math.exp(exponent) if exponent < 700 else float("inf")  # exp overflows near 709

    def _bound_to_basic(self, bound: float) -> float:
        # an integer lower bound of 0 minus the slack is negative: no constraint in log space
        return float("-inf") if bound <= 0 else self._to_basic(bound)


@dataclass(frozen=True)
class LogitSpace(RealNumberSpace):
    """``basic = log10(value / (1 - value)) / scale``; for probabilities such as dropout."""

    min: float = 0.0
    max: float = 1.0

    plot_scale: ClassVar[str] = "logit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min < 0 or self.max > 1:
            raise ValueError(f"LogitSpace: need 0 <= min < max <= 1, got min={self.min} max={self.max}")
        if self.is_integer:
            raise ValueError("LogitSpace cannot be integer")

    def _to_basic(self, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError(f"LogitSpace: value must be in [0, 1], got {value}")
        if value == 0:
            return float("-inf")
        if value == 1:
            return float("inf")
        return math.log10(value / (1 - value)) / self.scale

    def _from_basic(self, value: float) -> float:
        # 1 / (1 + 10**(-x)), written with expit so that large |x| does not overflow
        return float(expit(value * self.scale * math.log(10)))


_SPACE_TYPES: dict[str, type[RealNumberSpace]] = {cls.__name__: cls for cls in (LinearSpace, LogSpace, LogitSpace)}


def space_from_dict(d: dict[str, Any]) -> RealNumberSpace:
    """Rebuild a space from `RealNumberSpace.to_dict` output."""
    d = dict(d)
    type_name = d.pop("type")
    if type_name not in _SPACE_TYPES:
        raise ValueError(f"unknown space type {type_name!r}; known: {sorted(_SPACE_TYPES)}")
    cls = _SPACE_TYPES[type_name]
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in d:
            v = d.pop(f.name)
            kwargs[f.name] = decode_float(v) if f.name in ("min", "max", "scale") else v
    if d:
        raise ValueError(f"unknown keys for {type_name}: {sorted(d)}")
    return cls(**kwargs)


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: its name (the key in suggestion dicts), space and starting point."""

    name: str
    space: RealNumberSpace
    search_center: float | int
    """Where the search starts; the first suggestions are drawn around it."""

    def __post_init__(self) -> None:
        if not isinstance(self.space, RealNumberSpace):
            raise TypeError(f"Param {self.name!r}: only real-number spaces are supported, got {self.space!r}")
        if not self.space.min <= self.search_center <= self.space.max:
            raise ValueError(
                f"Param {self.name!r}: search_center {self.search_center} is outside "
                f"[{self.space.min}, {self.space.max}]"
            )
        if not math.isfinite(self.space.basic_from_param(self.search_center)):
            raise ValueError(f"Param {self.name!r}: search_center {self.search_center} maps to an infinite basic value")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "space": self.space.to_dict(), "search_center": self.search_center}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Param:
        return cls(name=d["name"], space=space_from_dict(d["space"]), search_center=d["search_center"])
