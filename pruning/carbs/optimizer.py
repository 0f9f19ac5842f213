"""The CARBS search loop: suggest, observe, forget, and save/load of the whole state.

One suggestion is made in one of four ways, in this order:

1. *random*: fewer than `num_random_samples` successes (or fewer than two, the
   least a surrogate can be fitted to) -> a Normal draw around the search center;
2. *resample*: every `resample_frequency` successes -> re-run the least
   repeated point of the Pareto front, to average out noise;
3. *bayesian*: fit the surrogates, draw candidates around the Pareto front
   and take the argmax of

       log EI(output over the front at the candidate's predicted cost)
       + log search-density prior (Normal around the nearest front point)
       + log P(success),

   restricted to a predicted cost under `max_suggestion_cost`;
4. *fallback*: if the surrogates cannot be fitted, a random draw around the front.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from pruning.carbs.pareto import (
    ObservationGroup,
    get_pareto_groups,
    group_observations,
    observation_group_cost,
    observation_group_output,
    pareto_area_from_groups,
)
from pruning.carbs.records import (
    SUGGESTION_ID_DICT_KEY,
    CARBSParams,
    ObservationInBasic,
    ObservationInParam,
    ObserveOutput,
    SuggestionInBasic,
    SuggestOutput,
)
from pruning.carbs.spaces import Param, ParamDictType, RealNumberSpace, decode_float, encode_float
from pruning.carbs.surrogate import SurrogateModel, log_expected_improvement

__all__ = ["CARBS", "STATE_FORMAT"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "sparse_lm.carbs/1"
"""Tag of the JSON state layout written by `CARBS.get_state_dict`."""

# Draw candidates in batches, doubling up to this many times while too few fall inside the bounds.
_MAX_SAMPLING_ROUNDS = 8
# Fewer successes than this and there is nothing to fit a GP to.
_MIN_OBSERVATIONS_FOR_SURROGATE = 2


class CARBS:
    """Cost-Aware pareto-Region Bayesian Search (Fetterman et al. 2023, "Tune As You Scale").

    Searches hyperparameters locally around the Pareto front of (cost, output),
    so that one run finds good settings at every scale. Thread-safe: several
    workers may call `suggest` and `observe` on one instance.

    Spaces: *param* space holds the user's values (``lr=3e-4``); *basic* space
    is where the search measures distances (``log10(lr) = -3.5``), see
    `pruning.carbs.spaces`.
    """

    def __init__(self, config: CARBSParams, params: Sequence[Param]) -> None:
        if len(params) == 0:
            raise ValueError("CARBS needs at least one Param")
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate param names: {names}")
        if SUGGESTION_ID_DICT_KEY in names:
            raise ValueError(f"{SUGGESTION_ID_DICT_KEY!r} is reserved and cannot be a param name")
        self.config = config
        self.params = list(params)
        self.param_space_by_name: dict[str, RealNumberSpace] = {p.name: p.space for p in self.params}
        self.real_dim = len(self.params)
        self.search_radius_in_basic = float(config.initial_search_radius)
        self.min_bounds_in_basic = np.array([p.space.min_bound_in_basic for p in self.params])
        self.max_bounds_in_basic = np.array([p.space.max_bound_in_basic for p in self.params])
        self.search_center_in_basic = np.zeros(self.real_dim)
        self.set_search_center({p.name: p.search_center for p in self.params})

        self.success_observations: list[ObservationInBasic] = []
        self.failure_observations: list[ObservationInBasic] = []
        self.outstanding_suggestions: dict[str, SuggestionInBasic] = {}  # by suggestion id
        self.resample_count = 0
        """Resample suggestions made so far; schedules the next one."""
        # The search's own generator: seeding or drawing from the global ones would change the
        # caller's random streams (the original seeded torch, numpy and `random` globally).
        self._rng = np.random.default_rng(config.seed)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ public API
    def set_search_center(self, input_in_param: ParamDictType) -> None:
        """Move the point that random suggestions are drawn around."""
        self.search_center_in_basic = self._param_to_basic(input_in_param)

    def suggest(self, suggestion_id: str | None = None, is_suggestion_remembered: bool = True) -> SuggestOutput:
        """Return the next point to run.

        A remembered suggestion carries ``suggestion_uuid`` in its dict and is
        imputed as pending until it is observed or forgotten.
        """
        with self._lock:
            if self._is_random_sampling():
                basic = self._random_point(np.expand_dims(self.search_center_in_basic, 0))
                log_info: dict[str, Any] = {"suggestion_kind": "random"}
            elif self._is_resample_due():
                basic = self._resample_point()
                log_info = {"suggestion_kind": "resample"}
            else:
                try:
                    # The GP matrices are at most a few hundred wide, where BLAS threads only add
                    # synchronisation: on a busy 2-core machine one thread made a suggestion 4x faster
                    # (0.17 s -> 0.04 s). Only BLAS pools are limited, not OpenMP, so a torch loop in
                    # another thread keeps its threads; the limit is lifted on return.
                    with threadpool_limits(limits=1, user_api="blas"):
                        basic, log_info = self._bayesian_point()
                except Exception as e:  # noqa: BLE001 -- a long search must outlive a numerical failure of one fit
                    logger.warning("CARBS: surrogate failed (%s), suggesting at random:\n%s", e, traceback.format_exc())
                    basic = self._random_point(self._pareto_origins())
                    log_info = {"suggestion_kind": "fallback", "fallback_reason": f"{type(e).__name__}: {e}"}

            suggestion = self._basic_to_param(basic)
            if is_suggestion_remembered:
                if suggestion_id is None:
                    # drawn from our generator so that a reloaded search names its suggestions identically
                    suggestion_id = str(uuid.UUID(bytes=self._rng.bytes(16), version=4))
                suggestion[SUGGESTION_ID_DICT_KEY] = suggestion_id
                self.outstanding_suggestions[suggestion_id] = SuggestionInBasic(basic, log_info)
            log = {
                "observation_count": self.observation_count,
                "cumulative_cost": self.cumulative_cost,
                "failed_observation_count": len(self.failure_observations),
                **log_info,
            }
            return SuggestOutput(suggestion=suggestion, log=log)

    def observe(self, new_observation_in_param: ObservationInParam) -> ObserveOutput:
        """Record a finished run (and forget its pending suggestion)."""
        with self._lock:
            record = self._to_record(new_observation_in_param)  # validate before touching any state
            self.forget_suggestion(new_observation_in_param.input)
            self._store(record, self._is_failure(new_observation_in_param))
            logs = self._observation_log(new_observation_in_param)
            if self.config.is_saved_on_every_observation:
                self._autosave()
            return ObserveOutput(logs=logs)

    def forget_suggestion(self, suggestion_to_forget: ParamDictType) -> None:
        """Stop imputing a pending suggestion (e.g. its worker died); dicts without an id are ignored."""
        with self._lock:
            suggestion_id = suggestion_to_forget.get(SUGGESTION_ID_DICT_KEY)
            if suggestion_id is None:
                return
            if self.outstanding_suggestions.pop(str(suggestion_id), None) is None:
                logger.info("CARBS: forgetting unknown suggestion id %s", suggestion_id)

    def initialize_from_observations(self, observations: Sequence[ObservationInParam]) -> ObserveOutput:
        """Add earlier results in bulk and move the search center to the best success."""
        with self._lock:
            records = [self._to_record(obs) for obs in observations]  # all valid, or nothing is added
            for obs, record in zip(observations, records):
                self._store(record, self._is_failure(obs))
            successes = [o for o in observations if not self._is_failure(o)]
            if successes:
                best = max(successes, key=lambda o: o.output * self.config.better_direction_sign)
                self.set_search_center(best.input)
            else:
                logger.warning("CARBS: no successful observation to set the search center from")
            return ObserveOutput(logs={"observation_count": self.observation_count})

    @property
    def observation_count(self) -> int:
        return len(self.success_observations) + len(self.failure_observations)

    @property
    def cumulative_cost(self) -> float:
        """Total cost of successful runs (failed runs' costs may be meaningless)."""
        return sum(o.cost for o in self.success_observations)

    def get_pareto_groups(self, is_conservative: bool | None = None) -> list[ObservationGroup]:
        """The current Pareto front, cheapest first (empty before the first success)."""
        if is_conservative is None:
            is_conservative = self.config.is_pareto_group_selection_conservative
        return get_pareto_groups(
            group_observations(self.success_observations),
            self.config.min_pareto_cost_fraction,
            self.config.better_direction_sign,
            is_conservative,
        )

    # ------------------------------------------------------------------ state
    def get_state_dict(self) -> dict[str, Any]:
        """The whole search state as plain JSON-able data (no pickles, no tensors)."""
        with self._lock:
            return {
                "format": STATE_FORMAT,
                "config": self.config.to_dict(),
                "params": [p.to_dict() for p in self.params],
                "search_center_in_basic": [encode_float(v) for v in self.search_center_in_basic],
                "success_observations": [o.to_dict() for o in self.success_observations],
                "failure_observations": [o.to_dict() for o in self.failure_observations],
                "outstanding_suggestions": {k: s.to_dict() for k, s in self.outstanding_suggestions.items()},
                "resample_count": self.resample_count,
                "rng_state": self._rng.bit_generator.state,  # ints and strings only
            }

    @classmethod
    def load_state_dict(cls, state: dict[str, Any], override_params: CARBSParams | None = None) -> CARBS:
        """Rebuild a search from `get_state_dict` output; it continues exactly where the saved one was."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a CARBS state: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        config = override_params if override_params is not None else CARBSParams.from_dict(state["config"])
        carbs = cls(config, [Param.from_dict(p) for p in state["params"]])
        carbs.search_center_in_basic = np.array([decode_float(v) for v in state["search_center_in_basic"]])
        carbs.success_observations = [ObservationInBasic.from_dict(o) for o in state["success_observations"]]
        carbs.failure_observations = [ObservationInBasic.from_dict(o) for o in state["failure_observations"]]
        carbs.outstanding_suggestions = {
            k: SuggestionInBasic.from_dict(s) for k, s in state["outstanding_suggestions"].items()
        }
        carbs.resample_count = int(state["resample_count"])
        carbs._rng.bit_generator.state = state["rng_state"]
        return carbs

    # the name the brief of this project used for the same thing
    load_from_state_dict = load_state_dict

    def serialize(self) -> str:
        """The state as a JSON string."""
        return json.dumps(self.get_state_dict(), allow_nan=False)

    @classmethod
    def load_from_string(cls, state: str, override_params: CARBSParams | None = None) -> CARBS:
        return cls.load_state_dict(json.loads(state), override_params)

    def save_to_file(self, path: str | Path) -> Path:
        """Write the state as JSON to `path` (atomically: a crash leaves the old file intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.get_state_dict(), allow_nan=False, indent=1))
        tmp.replace(path)
        return path

    @staticmethod
    def load_from_file(path: str | Path, override_params: CARBSParams | None = None) -> CARBS:
        return CARBS.load_state_dict(json.loads(Path(path).read_text()), override_params)

    # ------------------------------------------------------------------ conversions
    def _param_to_basic(self, input_in_param: ParamDictType) -> np.ndarray:
        names = set(self.param_space_by_name)
        given = set(input_in_param) - {SUGGESTION_ID_DICT_KEY}
        if given != names:
            raise ValueError(
                f"input params do not match the search: missing {sorted(names - given)}, unknown {sorted(given - names)}"
            )
        return np.array([space.basic_from_param(input_in_param[k]) for k, space in self.param_space_by_name.items()])

    def _basic_to_param(self, basic: np.ndarray) -> ParamDictType:
        return {k: space.param_from_basic(float(v)) for (k, space), v in zip(self.param_space_by_name.items(), basic)}

    @staticmethod
    def _is_failure(obs: ObservationInParam) -> bool:
        return bool(obs.is_failure) or not math.isfinite(float(obs.output))

    def _to_record(self, obs: ObservationInParam) -> ObservationInBasic:
        """Check an observation and convert it to basic space; raises ValueError naming the problem."""
        basic = self._param_to_basic(obs.input)
        if not np.all(np.isfinite(basic)):
            raise ValueError(f"observation input {obs.input} maps to a non-finite basic point {basic.tolist()}")
        if not self._is_failure(obs) and not (math.isfinite(float(obs.cost)) and obs.cost > 0):
            raise ValueError(f"a successful observation needs a finite cost > 0 (log cost is modelled), got {obs.cost}")
        suggestion_id = obs.input.get(SUGGESTION_ID_DICT_KEY)
        return ObservationInBasic(
            real_number_input=basic,
            output=float(obs.output),
            cost=float(obs.cost),
            suggestion_id=None if suggestion_id is None else str(suggestion_id),
        )

    def _store(self, record: ObservationInBasic, is_failure: bool) -> None:
        (self.failure_observations if is_failure else self.success_observations).append(record)

    # ------------------------------------------------------------------ sampling
    def _is_random_sampling(self) -> bool:
        n = len(self.success_observations)
        return n < self.config.num_random_samples or n < _MIN_OBSERVATIONS_FOR_SURROGATE

    def _is_resample_due(self) -> bool:
        freq = self.config.resample_frequency
        return freq > 0 and len(self.success_observations) > (self.resample_count + 1) * freq

    def _is_within_bounds(self, points: np.ndarray) -> np.ndarray:
        # strict, as the original: real parameters never sit exactly on a bound (log(0), logit(1))
        return np.all((points > self.min_bounds_in_basic) & (points < self.max_bounds_in_basic), axis=-1)

    def _round_integers(self, points: np.ndarray) -> np.ndarray:
        points = points.copy()
        for i, p in enumerate(self.params):
            points[:, i] = p.space.round_basic(points[:, i])
        return points

    def _sample_around(self, origins: np.ndarray, num_samples: int) -> np.ndarray:
        """Up to `num_samples` in-bounds, integer-rounded points, each Normal(radius) around a random origin.

        origins: (k, d) -> (m, d) with m <= num_samples (fewer only if the bounds reject nearly everything).
        """
        accepted: list[np.ndarray] = []
        num_accepted = 0
        batch = num_samples
        for _ in range(_MAX_SAMPLING_ROUNDS):
            which = self._rng.integers(len(origins), size=batch)
            points = origins[which] + self._rng.normal(0.0, self.search_radius_in_basic, size=(batch, self.real_dim))
            points = self._round_integers(points)
            points = points[self._is_within_bounds(points)]
            accepted.append(points)
            num_accepted += len(points)
            if num_accepted >= num_samples:
                break
            batch *= 2  # near a bound most draws fall outside; draw more next round
        return np.concatenate(accepted)[:num_samples]

    def _random_point(self, origins: np.ndarray) -> np.ndarray:
        points = self._sample_around(origins, 1)
        if len(points) == 0:
            raise RuntimeError(
                f"CARBS: no in-bounds point within radius {self.search_radius_in_basic} of {origins.tolist()} "
                f"(basic bounds {self.min_bounds_in_basic.tolist()} .. {self.max_bounds_in_basic.tolist()})"
            )
        return points[0]

    def _pareto_origins(self) -> np.ndarray:
        """First input of each Pareto group, (k, d); the search center while the front is empty."""
        front = self.get_pareto_groups()
        if not front:
            return np.expand_dims(self.search_center_in_basic, 0)
        return np.stack([g[0].real_number_input for g in front])

    def _resample_point(self) -> np.ndarray:
        # The non-conservative front, so that single lucky runs get the repeat that confirms or demotes them.
        front = sorted(self.get_pareto_groups(is_conservative=False), key=observation_group_cost)
        pending = [s.real_number_input for s in self.outstanding_suggestions.values()]

        def times_run(group: ObservationGroup) -> int:
            x = group[0].real_number_input
            return len(group) + sum(bool(np.allclose(x, p, rtol=1e-5, atol=1e-8)) for p in pending)

        counts = [times_run(g) for g in front]
        self.resample_count += 1
        # the cheapest of the least repeated points
        return front[counts.index(min(counts))][0].real_number_input.copy()

    # ------------------------------------------------------------------ the Bayesian step
    def _bayesian_point(self) -> tuple[np.ndarray, dict[str, Any]]:
        config = self.config
        successes = self.success_observations
        X = np.stack([o.real_number_input for o in successes])  # (n, d)
        model = SurrogateModel(self.search_radius_in_basic, config.better_direction_sign)
        model.fit_observations(X, np.array([o.output for o in successes]), np.array([o.cost for o in successes]))
        if self.outstanding_suggestions:
            X_pending = np.stack([s.real_number_input for s in self.outstanding_suggestions.values()])
            model.fit_suggestions(X_pending, self._rng, config.outstanding_suggestion_estimator)
        if self.failure_observations:
            X_failure = np.stack([o.real_number_input for o in self.failure_observations])
            model.fit_failures(X, X_failure)

        front = self.get_pareto_groups()
        origins = np.stack([g[0].real_number_input for g in front])  # (k, d)
        # The front as a piecewise-linear curve of surrogate output against log cost. It rises with cost
        # by construction, so unlike the original's GP fit through the front it is monotone.
        front_log_cost = np.log([observation_group_cost(g) for g in front])
        front_score = model.target_to_surrogate(np.array([observation_group_output(g) for g in front]))

        candidates = self._sample_around(origins, config.num_candidates_for_suggestion_per_dim * self.real_dim)
        if len(candidates) == 0:
            raise RuntimeError("no in-bounds candidate around the Pareto front")
        pred = model.predict(candidates)

        # Reference for the improvement: the front's value at the candidate's predicted cost.
        reference = np.interp(pred.log_cost_mean, front_log_cost, front_score)
        if config.is_expected_improvement_pareto_value_clamped:
            hi = front_log_cost[-1]
            if config.max_suggestion_cost is not None:
                hi = min(hi, math.log(config.max_suggestion_cost))
            lo = min(front_log_cost[0], hi)
            threshold = np.interp(self._rng.uniform(lo, hi), front_log_cost, front_score)
            reference = np.maximum(reference, threshold)
        if config.is_expected_improvement_value_always_max:
            reference = np.full_like(reference, front_score[-1])

        log_ei = log_expected_improvement(pred.output_mean, pred.output_var, reference, config.exploration_bias)
        # search-density prior: a Normal around the nearest front point, so the search stays local
        sq_dist = ((candidates[:, None, :] - origins[None, :, :]) ** 2).sum(-1).min(axis=1)  # (m,)
        log_density = -0.5 * sq_dist / self.search_radius_in_basic**2
        acquisition = log_ei + log_density + pred.log_success_probability

        predicted_cost = np.exp(pred.log_cost_mean)
        if config.max_suggestion_cost is not None:
            affordable = predicted_cost < config.max_suggestion_cost
            if affordable.any():
                acquisition = np.where(affordable, acquisition, -np.inf)
            else:
                # rather than fail (the original asserted), take the cheapest candidate
                logger.warning(
                    "CARBS: no candidate predicted under max_suggestion_cost=%s (cheapest %.4g); taking the cheapest",
                    config.max_suggestion_cost,
                    predicted_cost.min(),
                )
                acquisition = np.where(predicted_cost == predicted_cost.min(), acquisition, -np.inf)
        best = int(np.argmax(acquisition))

        log_info = {
            "suggestion_kind": "bayesian",
            "surrogate_output": float(pred.output_mean[best]),
            "surrogate_var": float(pred.output_var[best]),
            "pareto_surrogate": float(reference[best]),
            "target_estimate": float(model.surrogate_to_target(pred.output_mean[best : best + 1])[0]),
            "cost_estimate": float(predicted_cost[best]),
            "log_expected_improvement": float(log_ei[best]),
            "log_search_density": float(log_density[best]),
            "success_probability": float(np.exp(pred.log_success_probability[best])),
            "num_candidates": len(candidates),
        }
        return candidates[best].copy(), log_info

    # ------------------------------------------------------------------ logging and autosave
    def _observation_log(self, obs: ObservationInParam) -> dict[str, Any]:
        log: dict[str, Any] = {
            "observation_count": self.observation_count,
            "cumulative_cost": self.cumulative_cost,
            "failed_observation_count": len(self.failure_observations),
            "observation/is_failure": int(self._is_failure(obs)),
        }
        log.update({f"observation/{k}": v for k, v in obs.input.items() if k != SUGGESTION_ID_DICT_KEY})
        if not self._is_failure(obs):
            log["observation/output"] = float(obs.output)
            log["observation/cost"] = float(obs.cost)
        if self.success_observations:
            best = max(self.success_observations, key=lambda o: o.output * self.config.better_direction_sign)
            log.update({f"best_observation/{k}": v for k, v in self._basic_to_param(best.real_number_input).items()})
            log["best_observation/output"] = best.output
            log["best_observation/cost"] = best.cost
            front = self.get_pareto_groups()
            log["pareto_group_count"] = len(front)
            log["pareto_area"] = pareto_area_from_groups(front)
        return log

    def _autosave(self) -> None:
        self.save_to_file(Path(self.config.checkpoint_dir) / f"carbs_{self.observation_count}obs.json")
