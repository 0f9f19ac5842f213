"""Tests of CARBS (pruning/carbs): spaces, search quality, robustness, state, and RNG hygiene."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from pruning.carbs import (
    CARBS,
    SUGGESTION_ID_DICT_KEY,
    CARBSParams,
    LinearSpace,
    LogitSpace,
    LogSpace,
    ObservationInBasic,
    ObservationInParam,
    Param,
    SuggestOutput,
    get_pareto_groups,
    group_observations,
)
from pruning.carbs.spaces import space_from_dict
from pruning.carbs.surrogate import QuantileNormalTransform, SuccessClassifier, log_expected_improvement

# ---------------------------------------------------------------------------------------------
# a 3-D test problem: a learning rate (log), a width (integer, log2) and a dropout (logit)

BENCH_PARAMS = [
    Param("lr", LogSpace(min=1e-6, max=1.0), search_center=1e-3),
    Param("width", LogSpace(min=4, max=4096, is_integer=True, base=2), search_center=64),
    Param("dropout", LogitSpace(min=1e-3, max=1 - 1e-3), search_center=0.5),
]
# optimum in basic coordinates: lr = 10**-1.8, width = 2**7.5 (not an integer power), dropout odds 1:10
BENCH_OPTIMUM = np.array([-1.8, 7.5, -1.0])
BENCH_WEIGHTS = np.array([1.0, 0.3, 1.0])


def bench_basic(x: dict) -> np.ndarray:
    return np.array([p.space.basic_from_param(x[p.name]) for p in BENCH_PARAMS])


def bench_loss_and_cost(x: dict) -> tuple[float, float]:
    """A shifted quadratic in basic space; cost grows with width, so the Pareto front is non-trivial."""
    b = bench_basic(x)
    return float((BENCH_WEIGHTS * (b - BENCH_OPTIMUM) ** 2).sum()), float(2 ** (b[1] - 6))


def run_carbs(seed: int, budget: int) -> float:
    carbs = CARBS(CARBSParams(better_direction_sign=-1, seed=seed), BENCH_PARAMS)
    best = math.inf
    for _ in range(budget):
        out = carbs.suggest()
        assert out.log["suggestion_kind"] != "fallback", out.log
        loss, cost = bench_loss_and_cost(out.suggestion)
        best = min(best, loss)
        carbs.observe(ObservationInParam(input=out.suggestion, output=loss, cost=cost))
    return best


def run_random_search(seed: int, budget: int) -> float:
    """Uniform in the basic-space box of the bounds: the usual random-search baseline."""
    rng = np.random.default_rng(seed)
    lo = np.array([p.space.min_bound_in_basic for p in BENCH_PARAMS])
    hi = np.array([p.space.max_bound_in_basic for p in BENCH_PARAMS])
    best = math.inf
    for _ in range(budget):
        b = rng.uniform(lo, hi)
        x = {p.name: p.space.param_from_basic(v) for p, v in zip(BENCH_PARAMS, b)}
        best = min(best, bench_loss_and_cost(x)[0])
    return best


@pytest.mark.slow  # kept out of make test-fast (under 3 min); the full suite runs it
def test_carbs_beats_random_search():
    # Measured (4 seeds x 30 observations): CARBS mean best loss 0.089, random search 1.47
    # (16 seeds: 0.14 vs 1.13). A mutant that picks a random candidate around the front instead
    # of the acquisition argmax scored 1.18, so the 0.3 ratio below fails without a working surrogate.
    seeds, budget = range(4), 30
    carbs_mean = float(np.mean([run_carbs(s, budget) for s in seeds]))
    random_mean = float(np.mean([run_random_search(s, budget) for s in seeds]))
    assert carbs_mean < 0.3 * random_mean, f"CARBS {carbs_mean:.3f} vs random {random_mean:.3f}"


@pytest.mark.slow  # kept out of make test-fast (under 3 min); the full suite runs it
def test_constant_cost_searches_the_output_alone():
    """The pruning sweep gives every run the same cost (its mask steps): the front is one point and the
    search is plain Bayesian optimisation of the output; it must still run and improve on random search."""
    seeds, budget = range(3), 30

    def run(seed: int) -> float:
        carbs = CARBS(CARBSParams(better_direction_sign=-1, seed=seed), BENCH_PARAMS)
        best = math.inf
        for _ in range(budget):
            out = carbs.suggest()
            assert out.log["suggestion_kind"] != "fallback", out.log
            loss = bench_loss_and_cost(out.suggestion)[0]
            best = min(best, loss)
            carbs.observe(ObservationInParam(input=out.suggestion, output=loss, cost=200.0))
        assert len(carbs.get_pareto_groups()) == 1  # one cost: the front is the best run
        return best

    carbs_mean = float(np.mean([run(s) for s in seeds]))
    random_mean = float(np.mean([run_random_search(s, budget) for s in seeds]))
    assert carbs_mean < 0.5 * random_mean, f"CARBS {carbs_mean:.3f} vs random {random_mean:.3f}"


# ---------------------------------------------------------------------------------------------
# spaces


def test_linear_space_maps_and_rounds():
    space = LinearSpace(min=0, max=100, scale=10, is_integer=True)
    assert space.basic_from_param(37) == pytest.approx(3.7)
    assert space.param_from_basic(3.74) == 37 and isinstance(space.param_from_basic(3.74), int)
    assert space.param_from_basic(3.74, is_rounded=False) == pytest.approx(37.4)
    np.testing.assert_allclose(space.round_basic(np.array([3.74, 0.01])), [3.7, 0.0])
    # integers get a little slack so that the bounds themselves are allowed by the strict check
    assert space.min_bound_in_basic < space.basic_from_param(0) and space.max_bound_in_basic > 10.0
    coarse = LinearSpace(min=0, max=64, scale=8, is_integer=True, rounding_factor=8)
    assert coarse.param_from_basic(2.6) == 24


def test_log_space_maps_and_rounds():
    lr = LogSpace(min=1e-5, max=1.0)
    assert lr.basic_from_param(1e-3) == pytest.approx(-3.0)
    assert lr.param_from_basic(-3.0) == pytest.approx(1e-3)
    width = LogSpace(min=8, max=1024, base=2, is_integer=True, rounding_factor=8)
    assert width.basic_from_param(256) == pytest.approx(8.0)
    assert width.param_from_basic(8.04) == 264  # 2**8.04 = 263.2 -> nearest multiple of 8
    rounded = width.round_basic(np.array([8.04]))
    assert 2 ** rounded[0] == pytest.approx(264)
    assert LogSpace(min=0).basic_from_param(0.0) == -math.inf
    assert LogSpace(min=0, is_integer=True).min_bound_in_basic == -math.inf  # 0 - slack has no log
    with pytest.raises(ValueError):
        LogSpace(min=-1.0)
    with pytest.raises(ValueError):
        lr.basic_from_param(-1.0)


def test_logit_space_maps():
    p = LogitSpace(min=0.0, max=1.0, scale=0.5)
    assert p.basic_from_param(0.5) == pytest.approx(0.0)
    assert p.basic_from_param(10 / 11) == pytest.approx(2.0)  # log10(odds 10) / 0.5
    for v in (1e-4, 0.1, 0.5, 0.9, 1 - 1e-4):
        assert p.param_from_basic(p.basic_from_param(v)) == pytest.approx(v, rel=1e-9)
    assert p.param_from_basic(-1e6) == 0.0 and p.param_from_basic(1e6) == 1.0  # no overflow
    with pytest.raises(ValueError):
        LogitSpace(is_integer=True)
    with pytest.raises(ValueError):
        LogitSpace(min=-0.1)


def test_spaces_round_trip_through_dicts():
    for space in (LinearSpace(), LogSpace(min=4, max=64, base=2, is_integer=True), LogitSpace(max=0.5)):
        d = space.to_dict()
        assert space_from_dict(json.loads(json.dumps(d, allow_nan=False))) == space


def test_param_validation():
    with pytest.raises(ValueError, match="outside"):
        Param("lr", LogSpace(min=1e-5, max=1e-1), search_center=1.0)
    with pytest.raises(ValueError, match="infinite"):
        Param("lr", LogSpace(min=0, max=1e-1), search_center=0.0)
    with pytest.raises(ValueError, match="duplicate"):
        CARBS(CARBSParams(), [Param("a", LinearSpace(), 0.0), Param("a", LinearSpace(), 0.0)])
    with pytest.raises(ValueError, match="better_direction_sign"):
        CARBSParams(better_direction_sign=0)  # type: ignore[arg-type]


def test_suggestions_respect_bounds_and_integers():
    params = [
        # a center on the edge: half of all draws fall outside and must be rejected
        Param("a", LinearSpace(min=0.0, max=1.0, scale=0.3), search_center=1.0),
        Param("n", LogSpace(min=2, max=16, base=2, is_integer=True, scale=0.5), search_center=2),
        Param("p", LogitSpace(min=0.01, max=0.2), search_center=0.1),
    ]
    carbs = CARBS(CARBSParams(seed=3, num_candidates_for_suggestion_per_dim=30), params)
    for i in range(14):
        s = carbs.suggest().suggestion
        assert 0.0 < s["a"] < 1.0 and 0.01 < s["p"] < 0.2
        assert isinstance(s["n"], int) and 2 <= s["n"] <= 16
        carbs.observe(ObservationInParam(input=s, output=s["a"] + s["p"] - 0.01 * s["n"], cost=float(s["n"])))


# ---------------------------------------------------------------------------------------------
# robustness


SIMPLE_PARAMS = [Param("x", LinearSpace(min=-3, max=3), 0.0), Param("y", LinearSpace(min=-3, max=3), 0.0)]


def test_suggest_before_any_observation():
    carbs = CARBS(CARBSParams(num_random_samples=0), SIMPLE_PARAMS)
    out = carbs.suggest()
    assert isinstance(out, SuggestOutput) and out.log["suggestion_kind"] == "random"
    assert set(out.suggestion) == {"x", "y", SUGGESTION_ID_DICT_KEY}
    assert carbs.get_pareto_groups() == []


def test_survives_only_failures():
    carbs = CARBS(CARBSParams(num_random_samples=0, seed=1), SIMPLE_PARAMS)
    for _ in range(8):
        s = carbs.suggest().suggestion
        carbs.observe(ObservationInParam(input=s, output=float("nan"), cost=1.0, is_failure=True))
    assert len(carbs.failure_observations) == 8 and not carbs.success_observations
    assert carbs.get_pareto_groups() == []
    out = carbs.suggest()  # the original crashed here on max() of an empty Pareto set
    assert out.log["suggestion_kind"] == "random"
    # a non-finite output counts as a failure even when not flagged
    carbs.observe(ObservationInParam(input=out.suggestion, output=float("inf")))
    assert len(carbs.failure_observations) == 9
    # one success is not enough for a surrogate: still random, still no crash
    carbs.observe(ObservationInParam(input={"x": 0.1, "y": 0.2}, output=1.0))
    assert carbs.suggest().log["suggestion_kind"] == "random"


def test_pareto_front_of_resampled_groups_with_varying_costs():
    # every group resampled with two different costs: the cost quantile falls below every group's
    # mean cost, which made the original's max() over an empty list crash
    obs = []
    for i in range(3):
        x = np.array([float(i)])
        obs += [
            ObservationInBasic(x, output=float(i), cost=1.0 + i),
            ObservationInBasic(x, output=float(i), cost=3.0 + i),
        ]
    groups = group_observations(obs)
    assert len(groups) == 3 and all(len(g) == 2 for g in groups)
    front = get_pareto_groups(groups, min_pareto_cost_fraction=0.0, better_direction_sign=1, is_conservative=True)
    assert [g[0].output for g in front] == [0.0, 1.0, 2.0]
    assert get_pareto_groups([], 0.2, 1) == []


def failure_scenario(with_failures: bool, seed: int) -> CARBS:
    """Successes around the center that improve toward +x; optionally a cluster of failures at F."""
    carbs = CARBS(CARBSParams(better_direction_sign=1, seed=seed, resample_frequency=0), SIMPLE_PARAMS)
    rng = np.random.default_rng(123)
    for x, y in rng.normal(0.0, 0.3, size=(12, 2)):
        carbs.observe(ObservationInParam(input={"x": x, "y": y}, output=x - 0.5 * y**2, cost=1.0))
    if with_failures:
        for x, y in FAILURE_CENTER + rng.normal(0.0, 0.1, size=(6, 2)):
            carbs.observe(ObservationInParam(input={"x": x, "y": y}, output=0.0, is_failure=True))
    return carbs


FAILURE_CENTER = np.array([0.6, 0.0])


def test_failures_lower_suggestion_density_nearby():
    # Measured: 0 of 30 suggestions within 0.3 of the failures, against 20 of 30 when those runs are
    # never made (the output rises toward them, so without the success model the search goes there).
    near = {}
    for with_failures in (True, False):
        near[with_failures] = 0
        for seed in range(3):
            carbs = failure_scenario(with_failures, seed)
            for _ in range(10):
                s = carbs.suggest(is_suggestion_remembered=False).suggestion
                near[with_failures] += math.hypot(s["x"] - FAILURE_CENTER[0], s["y"] - FAILURE_CENTER[1]) < 0.3
    assert near[True] <= 5 and near[False] >= 10, near


def test_success_model_separates_failures():
    rng = np.random.default_rng(0)
    X_ok, X_bad = rng.normal(0.0, 0.3, size=(12, 2)), np.array([0.6, 0.0]) + rng.normal(0.0, 0.1, size=(6, 2))
    model = SuccessClassifier(np.concatenate([X_ok, X_bad]), np.r_[np.ones(12), np.zeros(6)].astype(bool), 0.3)
    p_bad = np.exp(model.log_predict(np.array([[0.6, 0.0]])))[0]
    p_ok = np.exp(model.log_predict(np.array([[-0.3, 0.0]])))[0]
    assert p_bad < 0.05 and p_ok > 0.9


def test_max_suggestion_cost_is_respected():
    carbs = CARBS(CARBSParams(better_direction_sign=-1, seed=0, max_suggestion_cost=2.0), BENCH_PARAMS)
    for _ in range(14):
        out = carbs.suggest()
        if out.log["suggestion_kind"] == "bayesian":
            assert out.log["cost_estimate"] < 2.0
        loss, cost = bench_loss_and_cost(out.suggestion)
        carbs.observe(ObservationInParam(input=out.suggestion, output=loss, cost=cost))


def test_resample_repeats_a_pareto_point():
    carbs = CARBS(CARBSParams(better_direction_sign=-1, seed=0, resample_frequency=3), BENCH_PARAMS)
    seen: list[dict] = []
    kinds = []
    for _ in range(8):
        out = carbs.suggest()
        kinds.append(out.log["suggestion_kind"])
        if kinds[-1] == "resample":
            point = {k: v for k, v in out.suggestion.items() if k != SUGGESTION_ID_DICT_KEY}
            assert any(all(math.isclose(point[k], s[k], rel_tol=1e-9) for k in point) for s in seen)
        loss, cost = bench_loss_and_cost(out.suggestion)
        seen.append(dict(out.suggestion))
        carbs.observe(ObservationInParam(input=out.suggestion, output=loss, cost=cost))
    assert "resample" in kinds and kinds[:4] == ["random"] * 4
    assert any(len(g) > 1 for g in group_observations(carbs.success_observations))


def test_observe_rejects_wrong_params():
    carbs = CARBS(CARBSParams(), SIMPLE_PARAMS)
    with pytest.raises(ValueError, match="missing"):
        carbs.observe(ObservationInParam(input={"x": 0.0}, output=1.0))
    with pytest.raises(ValueError, match="unknown"):
        carbs.observe(ObservationInParam(input={"x": 0.0, "y": 0.0, "z": 1.0}, output=1.0))
    pending = carbs.suggest().suggestion
    with pytest.raises(ValueError, match="cost"):
        carbs.observe(ObservationInParam(input=pending, output=1.0, cost=0.0))
    assert pending[SUGGESTION_ID_DICT_KEY] in carbs.outstanding_suggestions  # a rejected observation changes nothing
    assert carbs.observation_count == 0
    log_params = [Param("lr", LogSpace(min=0.0, max=1.0), 1e-3)]
    with pytest.raises(ValueError, match="non-finite"):
        CARBS(CARBSParams(), log_params).observe(ObservationInParam(input={"lr": 0.0}, output=1.0, is_failure=True))


# ---------------------------------------------------------------------------------------------
# pending suggestions


def test_forget_suggestion_removes_pending():
    carbs = CARBS(CARBSParams(seed=0), SIMPLE_PARAMS)
    a, b = carbs.suggest().suggestion, carbs.suggest().suggestion
    assert a[SUGGESTION_ID_DICT_KEY] != b[SUGGESTION_ID_DICT_KEY]
    assert set(carbs.outstanding_suggestions) == {a[SUGGESTION_ID_DICT_KEY], b[SUGGESTION_ID_DICT_KEY]}
    carbs.forget_suggestion(a)
    assert set(carbs.outstanding_suggestions) == {b[SUGGESTION_ID_DICT_KEY]}
    carbs.forget_suggestion(a)  # twice, or unknown ids, or no id at all: ignored
    carbs.forget_suggestion({"x": 0.0, "y": 0.0})
    carbs.observe(ObservationInParam(input=b, output=1.0))  # observing forgets too
    assert carbs.outstanding_suggestions == {}
    assert SUGGESTION_ID_DICT_KEY in b  # the caller's dict is not modified
    assert carbs.suggest(is_suggestion_remembered=False).suggestion.keys() == {"x", "y"}
    assert carbs.outstanding_suggestions == {}


def test_pending_suggestions_spread_parallel_workers():
    """Pending suggestions are imputed by Thompson draws, so parallel workers do not pile up.

    Measured mean pairwise distance of 5 suggestions from one state (seeds 0-3): 0.24-0.37 when each is
    left pending, 0.055-0.083 when none is remembered (all chase the same acquisition maximum).
    """
    for seed in range(3):
        spread = {}
        for remembered in (True, False):
            carbs = failure_scenario(False, seed)
            outs = [carbs.suggest(is_suggestion_remembered=remembered) for _ in range(5)]
            assert all(o.log["suggestion_kind"] == "bayesian" for o in outs)
            points = np.array([[o.suggestion["x"], o.suggestion["y"]] for o in outs])
            spread[remembered] = np.mean([np.linalg.norm(points[i] - points[j]) for i in range(5) for j in range(i)])
        assert spread[True] > 2 * spread[False], spread


# ---------------------------------------------------------------------------------------------
# state


def test_state_round_trips_mid_search(tmp_path):
    params = BENCH_PARAMS + [Param("shift", LinearSpace(), search_center=0.0)]  # infinite bounds too

    def loss_and_cost(x: dict) -> tuple[float, float]:
        loss, cost = bench_loss_and_cost(x)
        return loss + x["shift"] ** 2, cost

    def run(carbs: CARBS, steps: int, rng: np.random.Generator, log: list) -> None:
        for _ in range(steps):
            new = carbs.suggest().suggestion
            log.append(new)
            if len(carbs.outstanding_suggestions) >= 2:  # two workers: observe the oldest pending
                oldest_id = next(iter(carbs.outstanding_suggestions))
                oldest = next(s for s in log if s.get(SUGGESTION_ID_DICT_KEY) == oldest_id)
                loss, cost = loss_and_cost(oldest)
                failed = bool(rng.uniform() < 0.15)
                carbs.observe(ObservationInParam(input=oldest, output=loss, cost=cost, is_failure=failed))

    config = CARBSParams(
        better_direction_sign=-1, seed=7, resample_frequency=4, num_candidates_for_suggestion_per_dim=40
    )
    uninterrupted, log_a = CARBS(config, params), []
    run(uninterrupted, 12, np.random.default_rng(0), log_a)
    path = uninterrupted.save_to_file(tmp_path / "state" / "carbs.json")
    # the saved state has everything that must survive: pending work, failures, resamples
    assert uninterrupted.outstanding_suggestions and uninterrupted.failure_observations
    assert uninterrupted.resample_count > 0

    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    state = json.loads(text)
    assert state["format"] == "sparse_lm.carbs/1" and state["params"][3]["space"]["min"] == "-inf"

    resumed = CARBS.load_from_file(path)
    log_b = list(log_a)
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    run(uninterrupted, 10, rng_a, log_a)
    run(resumed, 10, rng_b, log_b)
    assert log_a[12:] == log_b[12:]  # same points, same ids
    assert resumed.get_state_dict() == uninterrupted.get_state_dict()
    # the string helpers and the state-dict names of the original agree with the file helpers
    assert CARBS.load_from_string(uninterrupted.serialize()).get_state_dict() == uninterrupted.get_state_dict()
    assert CARBS.load_from_state_dict(resumed.get_state_dict()).get_state_dict() == resumed.get_state_dict()


def test_autosave_writes_json(tmp_path):
    carbs = CARBS(CARBSParams(is_saved_on_every_observation=True, checkpoint_dir=str(tmp_path)), SIMPLE_PARAMS)
    carbs.observe(ObservationInParam(input=carbs.suggest().suggestion, output=1.0))
    assert json.loads((tmp_path / "carbs_1obs.json").read_text())["success_observations"]


# ---------------------------------------------------------------------------------------------
# global random generators


def global_draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_global_rngs_untouched():
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = [global_draws() for _ in range(3)]

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    drawn = [global_draws()]
    carbs = failure_scenario(True, seed=5)  # observations, failures -> success model
    drawn.append(global_draws())
    pending = carbs.suggest().suggestion  # pending -> Thompson draw
    carbs.suggest()
    carbs.observe(ObservationInParam(input=pending, output=0.1))
    CARBS.load_from_string(carbs.serialize()).suggest()
    drawn.append(global_draws())
    assert drawn == expected


# ---------------------------------------------------------------------------------------------
# numerics


def test_log_expected_improvement_matches_closed_form_and_stays_finite():
    from scipy.stats import norm

    mean = np.array([0.0, 1.0, -2.0, 0.5])
    var = np.array([1.0, 0.25, 4.0, 0.01])
    ref = np.array([0.5, 0.0, 0.0, 0.0])
    z = (mean - ref - 0.2) / np.sqrt(var)
    closed = np.sqrt(var) * (z * norm.cdf(z) + norm.pdf(z))
    np.testing.assert_allclose(np.exp(log_expected_improvement(mean, var, ref, 0.2)), closed, rtol=1e-9)
    # far below the reference the plain formula underflows to 0 for every candidate; the log form
    # keeps them ordered, and is smooth across its switch to the asymptotic series at z = -30
    z_far = np.array([-29.0, -29.999, -30.001, -50.0, -500.0])
    far = log_expected_improvement(z_far, np.ones(5), np.zeros(5), 0.0)
    assert np.all(np.isfinite(far)) and np.all(np.diff(far) < 0)
    slope = (far[1] - far[2]) / 0.002  # d/dz log EI = Phi(z) / (phi(z) + z Phi(z)) ~ -z - 2/z
    assert slope == pytest.approx(30.0 + 2 / 30.0, rel=1e-3)


def test_quantile_normal_transform_is_monotone_and_invertible():
    values = np.array([3.0, -1.0, 10.0, 10.0, 0.5, 1e6])
    t = QuantileNormalTransform().fit(values)
    scores = t.transform(np.sort(values))
    assert np.all(np.diff(scores) >= 0) and np.all(np.abs(scores) < 2.0)  # extremes stay moderate
    np.testing.assert_allclose(t.inverse_transform(t.transform(values)), values)
