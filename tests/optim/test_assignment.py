"""Work assignment: greedy n^3 placement, the worker grid of each strategy."""

from __future__ import annotations

import itertools
import random

import pytest
from torch import nn

from dtune.optim import KFAC, Assignment, grad_workers_for, plan_work


def _optimal_makespan(costs: list[float], workers: int) -> float:
    best = float("inf")
    for placement in itertools.product(range(workers), repeat=len(costs)):
        loads = [0.0] * workers
        for cost, worker in zip(costs, placement, strict=True):
            loads[worker] += cost
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_greedy_placement_is_within_lpt_bound_of_the_optimum(seed):
    rng = random.Random(seed)
    workers = rng.choice([2, 3, 4])
    costs = [float(rng.choice([8, 16, 64, 128, 145, 513]) ** 3) for _ in range(rng.randint(3, 7))]
    plan = plan_work(costs, world_size=workers, grad_workers=workers)
    assert sum(plan.loads) == pytest.approx(sum(costs))
    for worker in range(workers):
        placed = sum(c for c, w in zip(costs, plan.inverse_workers, strict=True) if w == worker)
        assert plan.loads[worker] == pytest.approx(placed)
    optimum = _optimal_makespan(costs, workers)
    assert max(plan.loads) <= (4 / 3 - 1 / (3 * workers)) * optimum + 1e-6  # Graham's LPT bound


def test_balancing_beats_round_robin_on_a_skewed_model():
    # one big layer and many small ones: round-robin (SC20's kfac-lw) piles work on worker 0
    costs = [513**3, 64**3, 64**3, 64**3, 145**3, 10**3, 32**3, 16**3]
    plan = plan_work(costs, world_size=2, grad_workers=2)
    round_robin = [sum(costs[i] for i in range(w, len(costs), 2)) for w in range(2)]
    assert max(plan.loads) == costs[0]  # the big layer alone on one worker, the rest on the other
    assert max(plan.loads) < max(round_robin)


def test_grid_of_each_strategy():
    assert grad_workers_for(Assignment.COMM_OPT, 0.5, 8) == 8
    assert grad_workers_for(Assignment.MEM_OPT, 0.5, 8) == 1
    assert grad_workers_for(Assignment.HYBRID, 0.5, 8) == 4
    assert grad_workers_for(Assignment.HYBRID, 0.5, 6) == 3
    assert grad_workers_for(Assignment.HYBRID, 0.7, 6) == 3  # round(4.2) = 4 does not divide 6
    plan = plan_work([5.0, 4.0, 3.0, 2.0, 1.0], world_size=8, grad_workers=4)
    assert plan.columns == 2
    assert [plan.column_ranks(c) for c in range(2)] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert [plan.row_ranks(r) for r in range(4)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    for layer in range(5):
        column = plan.columns_of_layers[layer]
        assert plan.inverse_workers[layer] in plan.column_ranks(column)
        for rank in range(8):  # every row has exactly one gradient worker of every layer
            source = plan.grad_source(layer, rank)
            assert source in plan.row_ranks(plan.row_of(rank)) and plan.is_grad_worker(layer, source)
            assert plan.is_grad_worker(layer, rank) == (source == rank)


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="must divide the world size 4"):
        plan_work([1.0], world_size=4, grad_workers=3)
    with pytest.raises(ValueError, match=r"`grad_worker_fraction` is 1\.5"):
        grad_workers_for(Assignment.HYBRID, 1.5, 4)


def test_one_process_plans_everything_on_rank_zero():
    kfac = KFAC(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), assignment=Assignment.MEM_OPT)
    assert kfac.plan.world_size == 1 and kfac.plan.inverse_workers == (0, 0)
    assert kfac.plan.loads == (float(5**3 + 8**3 + 9**3 + 2**3),)
