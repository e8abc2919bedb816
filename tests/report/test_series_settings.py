"""Series along epsilon and K keep a study's setting axes apart (a clipping mode is its own
series) and share the non-private point, whose settings lack the privacy ones."""

from __future__ import annotations

import math

import pandas as pd

from dpalign.report.series import cells_from_tables, epsilon_series, k_series


def _points() -> pd.DataFrame:
    rows = []
    for eps in (8.0, 2.0):
        for clip in ("fixed", "adaptive"):
            rows.append({"point": f"dp-{eps}-{clip}", "mechanism": "dp_sgd",
                         "epsilon_target": eps, "k": 32, "loss": "dpo", "lr": 0.01,
                         "optim.lr": 0.01, "privacy.clipping": clip, "n_runs": 1})
    rows.append({"point": "none", "mechanism": "none", "epsilon_target": math.inf, "k": 32,
                 "loss": "dpo", "lr": 0.01, "optim.lr": 0.01, "privacy.clipping": math.nan,
                 "n_runs": 1})
    return pd.DataFrame(rows)


def test_each_clipping_mode_is_a_series_sharing_the_no_dp_point() -> None:
    points = _points()
    runs = points.assign(run=points["point"] + "-s0", status="ok", seed=0)
    cells = cells_from_tables(points, runs)
    by_eps = epsilon_series(cells)
    assert sorted(s.label for s in by_eps) == ["K=32, clipping=adaptive", "K=32, clipping=fixed"]
    for series in by_eps:
        clip = dict(series.group["settings"])["privacy.clipping"]
        assert [c.point for c in series.cells] == ["none", f"dp-8.0-{clip}", f"dp-2.0-{clip}"]
    by_k = k_series(cells)
    assert all(len(s.cells) == 1 for s in by_k)
    assert sorted(s.label for s in by_k) == [
        "ε=2, clipping=adaptive", "ε=2, clipping=fixed", "ε=8, clipping=adaptive",
        "ε=8, clipping=fixed", "∞ (no DP)"]


def test_a_per_mechanism_lr_override_keeps_the_no_dp_point_in_each_series() -> None:
    """The quickstart's DP runs train at lr 5e-3 (the mechanism's override), its no-DP runs
    at 5e-4: effective settings, not a grid axis, so each ε series still starts at no DP."""
    rows = [{"point": f"dp-{eps}", "mechanism": "dp_sgd", "epsilon_target": eps, "k": 32,
             "loss": "dpo", "lr": 5e-3, "optimizer": "adamw", "n_runs": 1}
            for eps in (8.0, 2.0)]
    rows.append({"point": "none", "mechanism": "none", "epsilon_target": math.inf, "k": 32,
                 "loss": "dpo", "lr": 5e-4, "optimizer": "adamw", "n_runs": 1})
    points = pd.DataFrame(rows)
    runs = points.assign(run=points["point"] + "-s0", status="ok", seed=0)
    (series,) = epsilon_series(cells_from_tables(points, runs))
    assert [c.point for c in series.cells] == ["none", "dp-8.0", "dp-2.0"]
    assert series.label == "K=32"
    # a swept lr (grid.lr / grid.optim.lr: the optim.lr column) is a coordinate: the no-DP
    # point at another lr is another configuration and does not join the DP series
    swept = points.assign(**{"optim.lr": points["lr"]})
    (series,) = epsilon_series(cells_from_tables(swept, runs))
    assert [c.point for c in series.cells] == ["dp-8.0", "dp-2.0"]
