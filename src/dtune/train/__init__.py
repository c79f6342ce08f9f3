"""Distributed data-parallel training: worker groups, strategies, sharding.

A training loop meets this layer through :func:`prepare` (and :func:`shard`, :func:`context`);
it runs standalone with :func:`launch` or as one trial of a search with
``dtune.run(..., resources=dtune.Resources(workers=N))``. This layer knows nothing of trials.
"""

from dtune.train._allreduce import AllReduce, CommHookProvider
from dtune.train._codistillation import Codistillation, DistillLoss
from dtune.train._local_sgd import LocalSGD
from dtune.train._schedules import CodistillationRecipe, shift_milestones
from dtune.train._shadowsync import ForegroundSync, ShadowSync, SyncStats
from dtune.train._sync_algorithms import Apply, SyncAlgorithm
from dtune.train.context import TrainContext, context
from dtune.train.launch import LaunchResult, WorkerGroupError, launch
from dtune.train.prepare import prepare, strategy_of, unwrap
from dtune.train.shard import shard
from dtune.train.strategy import Strategy

__all__ = [
    "AllReduce",
    "Apply",
    "Codistillation",
    "CodistillationRecipe",
    "CommHookProvider",
    "DistillLoss",
    "ForegroundSync",
    "LaunchResult",
    "LocalSGD",
    "ShadowSync",
    "Strategy",
    "SyncAlgorithm",
    "SyncStats",
    "TrainContext",
    "WorkerGroupError",
    "context",
    "launch",
    "prepare",
    "shard",
    "shift_milestones",
    "strategy_of",
    "unwrap",
]
