"""The Pareto front of (cost, output): the cheapest way found so far to reach each output level.

Observations of the same input (resamples) form a *group* whose output and
cost are averaged. The front is a list of groups sorted by cost, each better
than every cheaper one. Unlike the original library, an empty set of
observations gives an empty front instead of an exception; callers fall back
to sampling around the search center.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from pruning.carbs.records import ObservationInBasic

__all__ = [
    "ObservationGroup",
    "get_pareto_groups",
    "group_observations",
    "observation_group_cost",
    "observation_group_output",
    "pareto_area_from_groups",
]

ObservationGroup = tuple[ObservationInBasic, ...]
"""Observations with the same input (up to float noise)."""


def group_observations(observations: Sequence[ObservationInBasic]) -> list[ObservationGroup]:
    """Group observations whose inputs are close; groups keep the order of their first member."""
    groups: list[list[ObservationInBasic]] = []
    for obs in observations:
        for group in groups:
            if np.allclose(group[0].real_number_input, obs.real_number_input, rtol=1e-5, atol=1e-8):
                group.append(obs)
                break
        else:
            groups.append([obs])
    return [tuple(g) for g in groups]


def observation_group_cost(group: Sequence[ObservationInBasic]) -> float:
    return sum(obs.cost for obs in group) / len(group)


def observation_group_output(group: Sequence[ObservationInBasic]) -> float:
    return sum(obs.output for obs in group) / len(group)


def get_pareto_groups(
    groups: Sequence[ObservationGroup],
    min_pareto_cost_fraction: float,
    better_direction_sign: int,
    is_conservative: bool = False,
) -> list[ObservationGroup]:
    """The Pareto front, sorted by cost; empty when there are no groups.

    Groups cheaper than the `min_pareto_cost_fraction` quantile of all costs
    compete for one entry, the best of them. After that a group joins when its
    mean output beats the last member's. With `is_conservative`, a group of a
    single run must beat the last member's best *single* run instead; and if any
    cheap group was resampled, only resampled ones compete for the first entry.
    Both make one lucky noisy run less likely to become a search origin.
    """
    if len(groups) == 0:
        return []
    sign = better_direction_sign

    def score(group: ObservationGroup) -> float:  # larger is better
        return observation_group_output(group) * sign

    def best_single(group: ObservationGroup) -> float:
        return max(obs.output * sign for obs in group)

    all_costs = np.array([obs.cost for group in groups for obs in group])
    # The quantile is over single runs, but groups compete by mean cost; raising the threshold to the
    # cheapest group's mean keeps `cheap` non-empty (the original crashed here when all groups were
    # resampled with varying costs).
    min_pareto_cost = max(
        float(np.quantile(all_costs, min_pareto_cost_fraction)),
        min(observation_group_cost(g) for g in groups),
    )
    cheap = [g for g in groups if observation_group_cost(g) <= min_pareto_cost]
    if is_conservative and any(len(g) > 1 for g in cheap):
        cheap = [g for g in cheap if len(g) > 1]
    front: list[ObservationGroup] = [max(cheap, key=score)]

    rest = sorted((g for g in groups if observation_group_cost(g) > min_pareto_cost), key=observation_group_cost)
    for group in rest:
        last = front[-1]
        threshold = best_single(last) if (is_conservative and len(group) == 1) else score(last)
        if score(group) > threshold:
            front.append(group)
    return front


def pareto_area_from_groups(front: Sequence[ObservationGroup]) -> float:
    """Area under the front's step curve (output held until the next, costlier point); a progress metric."""
    area = 0.0
    for prev, nxt in itertools.pairwise(front):
        area += (observation_group_cost(nxt) - observation_group_cost(prev)) * observation_group_output(prev)
    return area
