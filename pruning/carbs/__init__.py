"""CARBS: cost-aware local Bayesian hyperparameter search around the Pareto front of (cost, output).

A re-implementation of the public API of imbue-ai/carbs ("Tune As You Scale",
Fetterman et al. 2023) for this project; see SPEC §6. Typical use::

    carbs = CARBS(CARBSParams(better_direction_sign=-1, seed=0), [
        Param("lr", LogSpace(min=1e-5, max=1e-1), search_center=3e-4),
        Param("d_model", LogSpace(min=64, max=2048, is_integer=True, base=2), search_center=256),
    ])
    while budget_left():
        s = carbs.suggest().suggestion            # {"lr": ..., "d_model": ..., "suggestion_uuid": ...}
        loss, seconds, failed = train(**s)
        carbs.observe(ObservationInParam(input=s, output=loss, cost=seconds, is_failure=failed))
    carbs.save_to_file("carbs.json")               # CARBS.load_from_file("carbs.json") continues exactly

Why scikit-learn for the Gaussian processes: a search sees tens to a few
hundred observations, so exact GPs on the CPU fit in milliseconds; sklearn's
``GaussianProcessRegressor`` is well kept, already a dependency,
deterministic (L-BFGS from a fixed start, no restarts) and needs no
pyro/gpytorch stack or GPU. Output, log cost and success (+-1 labels read
through a probit, see `surrogate.SuccessClassifier`) are three such GPs. The original's pyro GP was trained with Adam at
lr 1e-4, which left its length scales at their initial value; here they are
fitted by maximum marginal likelihood within bounds tied to the search radius.

Differences from the original, on purpose:

* state is plain JSON (observations, pending suggestions, RNG state), loadable
  without torch or pickle; ``save_to_file(path)`` takes a path;
* the global random generators (``random``, ``numpy.random``, ``torch``) are
  never seeded or drawn from: the search owns a ``numpy.random.Generator``;
* an empty Pareto front (nothing observed yet, or only failures) falls back to
  sampling around the search center instead of crashing;
* the front is interpolated linearly in log cost instead of fitted by a GP
  (monotone by construction); expected improvement is computed in logs so it
  still ranks candidates far below the front;
* no wandb/S3 integration; autosave is off by default; a budget that no
  candidate meets picks the cheapest candidate instead of asserting.
"""

from pruning.carbs.optimizer import CARBS, STATE_FORMAT
from pruning.carbs.pareto import ObservationGroup, get_pareto_groups, group_observations
from pruning.carbs.records import (
    SUGGESTION_ID_DICT_KEY,
    CARBSParams,
    ObservationInBasic,
    ObservationInParam,
    ObserveOutput,
    SuggestionInBasic,
    SuggestOutput,
)
from pruning.carbs.spaces import LinearSpace, LogitSpace, LogSpace, Param, ParamDictType, RealNumberSpace

__all__ = [
    "CARBS",
    "STATE_FORMAT",
    "SUGGESTION_ID_DICT_KEY",
    "CARBSParams",
    "LinearSpace",
    "LogSpace",
    "LogitSpace",
    "ObservationGroup",
    "ObservationInBasic",
    "ObservationInParam",
    "ObserveOutput",
    "Param",
    "ParamDictType",
    "RealNumberSpace",
    "SuggestOutput",
    "SuggestionInBasic",
    "get_pareto_groups",
    "group_observations",
]
