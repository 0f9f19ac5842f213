"""The settings of a CARBS search and the records it exchanges with its caller."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np

from pruning.carbs.spaces import ParamDictType, decode_float, encode_float

__all__ = [
    "SUGGESTION_ID_DICT_KEY",
    "CARBSParams",
    "ObservationInBasic",
    "ObservationInParam",
    "ObserveOutput",
    "SuggestOutput",
    "SuggestionInBasic",
]

SUGGESTION_ID_DICT_KEY = "suggestion_uuid"
"""Key under which `CARBS.suggest` puts the suggestion's id into the suggestion dict."""


@dataclass
class CARBSParams:
    """Settings of one search. Set `better_direction_sign`, `seed` and perhaps `max_suggestion_cost`;
    the rest rarely need changing (same defaults as the original library, except autosave)."""

    better_direction_sign: Literal[-1, 1] = 1
    """+1 to maximise the output, -1 to minimise it (e.g. a loss)."""
    seed: int = 0
    """Seed of the search's own random generator (the global generators are never touched)."""
    num_random_samples: int = 4
    """Suggest random points around the search center until this many observations succeeded."""
    is_saved_on_every_observation: bool = False
    """Write a JSON state file to `checkpoint_dir` after every observation (off by default, unlike the
    original, so that library use never writes files unasked)."""
    checkpoint_dir: str = "checkpoints/"
    """Folder for the autosave files ``carbs_<n>obs.json``."""
    initial_search_radius: float = 0.3
    """Standard deviation, in basic units, of the Normal that candidates are drawn from around their origin."""
    exploration_bias: float = 1.0
    """Expected improvement is taken over (pareto value + this), in normal-quantile units of the output:
    larger favours uncertain candidates."""
    num_candidates_for_suggestion_per_dim: int = 100
    """Candidates scored per suggestion = this x number of parameters."""
    resample_frequency: int = 5
    """Every this many successful observations, re-run a Pareto point to average out noise (0: never)."""
    max_suggestion_cost: float | None = None
    """Only suggest candidates whose predicted cost is below this (None: no budget)."""
    min_pareto_cost_fraction: float = 0.2
    """Observations cheaper than this quantile of all costs compete for the single cheapest Pareto point,
    so that a few very cheap, useless runs do not anchor the front."""
    is_pareto_group_selection_conservative: bool = True
    """A single (unrepeated) observation joins the front only if it beats the best *single* run of the
    previous group, which damps thrash in noisy regions."""
    is_expected_improvement_pareto_value_clamped: bool = True
    """Draw a cost log-uniformly along the front and do not let the reference value fall below the
    front's value there; biases the search toward the expensive end of the front."""
    is_expected_improvement_value_always_max: bool = False
    """Ablation: measure improvement over the best point on the front, whatever the candidate's cost."""
    outstanding_suggestion_estimator: Literal["THOMPSON", "MEAN"] = "THOMPSON"
    """How pending suggestions are imputed before scoring: a joint draw from the output GP (parallel
    workers then spread out) or its mean."""

    def __post_init__(self) -> None:
        if self.better_direction_sign not in (-1, 1):
            raise ValueError(f"better_direction_sign must be -1 or 1, got {self.better_direction_sign}")
        if self.num_random_samples < 0:
            raise ValueError(f"num_random_samples must be >= 0, got {self.num_random_samples}")
        if not self.initial_search_radius > 0:
            raise ValueError(f"initial_search_radius must be > 0, got {self.initial_search_radius}")
        if self.num_candidates_for_suggestion_per_dim < 1:
            raise ValueError(
                f"num_candidates_for_suggestion_per_dim must be >= 1, got {self.num_candidates_for_suggestion_per_dim}"
            )
        if self.resample_frequency < 0:
            raise ValueError(f"resample_frequency must be >= 0 (0 disables), got {self.resample_frequency}")
        if self.max_suggestion_cost is not None and not self.max_suggestion_cost > 0:
            raise ValueError(f"max_suggestion_cost must be > 0 or None, got {self.max_suggestion_cost}")
        if not 0 <= self.min_pareto_cost_fraction <= 1:
            raise ValueError(f"min_pareto_cost_fraction must be in [0, 1], got {self.min_pareto_cost_fraction}")
        if self.outstanding_suggestion_estimator not in ("THOMPSON", "MEAN"):
            raise ValueError(
                f"outstanding_suggestion_estimator must be 'THOMPSON' or 'MEAN', got {self.outstanding_suggestion_estimator!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CARBSParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CARBSParams keys {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class ObservationInParam:
    """A finished run as the caller reports it."""

    input: ParamDictType
    """The suggestion dict that was run (its ``suggestion_uuid`` entry, if any, is used to forget it)."""
    output: float
    """The target value (e.g. validation loss)."""
    cost: float = 1.0
    """What the run cost, usually seconds or FLOPs; must be > 0 for successes."""
    is_failure: bool = False
    """The run did not finish (OOM, divergence); its output is ignored. Non-finite outputs count as failures."""


@dataclass
class ObservationInBasic:
    """An observation as CARBS stores it: input in basic space."""

    real_number_input: np.ndarray  # (num_params,)
    output: float
    cost: float = 1.0
    suggestion_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "real_number_input": [encode_float(v) for v in self.real_number_input],
            "output": encode_float(self.output),
            "cost": encode_float(self.cost),
            "suggestion_id": self.suggestion_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObservationInBasic:
        return cls(
            real_number_input=np.array([decode_float(v) for v in d["real_number_input"]], dtype=float),
            output=decode_float(d["output"]),
            cost=decode_float(d["cost"]),
            suggestion_id=d.get("suggestion_id"),
        )


@dataclass
class SuggestionInBasic:
    """A suggestion in basic space, with what the surrogate thought of it."""

    real_number_input: np.ndarray  # (num_params,)
    log_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "real_number_input": [encode_float(v) for v in self.real_number_input],
            "log_info": {k: _jsonable(v) for k, v in self.log_info.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SuggestionInBasic:
        return cls(
            real_number_input=np.array([decode_float(v) for v in d["real_number_input"]], dtype=float),
            log_info=dict(d.get("log_info", {})),
        )


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else str(float(v))
    raise TypeError(f"log value {v!r} is not JSON-able")


@dataclass
class SuggestOutput:
    """What `CARBS.suggest` returns."""

    suggestion: ParamDictType
    """Parameter values by name, plus ``suggestion_uuid`` when the suggestion is remembered."""
    log: dict[str, Any] = field(default_factory=dict)
    """How it was chosen (``suggestion_kind``) and the surrogate's predictions for it."""


@dataclass
class ObserveOutput:
    """What `CARBS.observe` returns."""

    logs: dict[str, Any] = field(default_factory=dict)
