"""Small shared builders for the fl tests."""

from __future__ import annotations

import numpy as np

from dtune.fl import Estimates, SelectionContext


def context(
    totals, *, deadline=30.0, k=3, forecasts=None, p_available=None, round=0, num_samples=None
) -> SelectionContext:
    """A selection context over candidates 0..n-1 whose observed totals are ``totals`` (all in
    training; reports take no time) and whose clients forecast ``forecasts`` (default: the same)."""
    totals = np.asarray(totals, dtype=float)
    n = len(totals)
    observed = Estimates(train_s=totals, report_s=np.zeros(n), p_available=np.ones(n))
    forecast_totals = totals if forecasts is None else np.asarray(forecasts, dtype=float)
    p = np.ones(n) if p_available is None else np.asarray(p_available, dtype=float)

    def forecaster(clients):
        return Estimates(
            train_s=forecast_totals[clients], report_s=np.zeros(len(clients)), p_available=p[clients]
        )

    return SelectionContext(
        round=round,
        clock_s=0.0,
        deadline_s=deadline,
        num_select=k,
        candidates=np.arange(n),
        num_samples=np.full(n, 10) if num_samples is None else np.asarray(num_samples),
        observed=observed,
        forecaster=forecaster,
    )
