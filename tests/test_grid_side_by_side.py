"""Smoke test of benchmarks/grid_side_by_side.py and checks of its grid-learning peers (GITS, LD3) on cases whose
answer is known independently."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.peers_grid import gits, ld3
from benchmarks.peers_grid.continuous import ContinuousSchedule, sample


def _brute_force_path(cost, steps, coeff):
    """Every increasing path 0 -> n-1 with `steps` edges, weighted c0 + coeff c1 + coeff^2 c2 ... (GITS's recursion
    V[j, k] = c[j, i] + coeff V[i, k - 1] unrolled), minimised by enumeration."""
    n = cost.shape[0]
    best, best_path = np.inf, None
    for mid in itertools.combinations(range(1, n - 1), steps - 1):
        path = (0, *mid, n - 1)
        total = sum(coeff ** e * cost[a, b] for e, (a, b) in enumerate(zip(path[:-1], path[1:])))
        if total < best - 1e-12:
            best, best_path = total, list(path)
    return best_path


def test_gits_dp_finds_the_optimal_path_on_a_hand_made_cost_matrix():
    # 5 timestamps, 2 steps. Direct edges are costly except 0 -> 3 -> 4; the greedy first edge 0 -> 1 (cost 0.1)
    # leads to an expensive remainder (1 -> 4 costs 9), so the optimum is [0, 3, 4] with 1 + 1.15 * 1 = 2.15.
    inf = np.inf
    cost = np.array([[inf, 0.1, 5.0, 1.0, 50.0],
                     [inf, inf, 2.0, 3.0, 9.0],
                     [inf, inf, inf, 4.0, 4.0],
                     [inf, inf, inf, inf, 1.0],
                     [inf, inf, inf, inf, inf]])
    assert gits.dp_path(cost, 2, 1.15) == [0, 3, 4]
    # and on random matrices it agrees with enumeration of every path, for several step counts and coefficients
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 9))
        c = np.triu(rng.uniform(0.1, 3.0, (n, n)), 1)
        c[c == 0] = np.inf
        for steps in range(1, n):
            for coeff in (1.0, 1.15, 0.8):
                assert gits.dp_path(c, steps, coeff) == _brute_force_path(c, steps, coeff), (trial, steps, coeff)


def test_gits_dp_refuses_impossible_step_counts():
    with pytest.raises(ValueError, match="num_steps"):
        gits.dp_path(np.zeros((4, 4)), 4, 1.15)


def test_ld3_parameterisation_is_monotone_keeps_the_ends_and_clips_the_decoupled_time():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        xi = torch.randn(9, generator=gen, dtype=torch.float64) * 3
        eta = torch.randn(9, generator=gen, dtype=torch.float64) * 100  # far beyond the clip
        times, taus = ld3.ld3_times(xi, eta, 999.0, -1.0, win_rate=0.5)
        assert torch.all(times[1:] < times[:-1])
        assert float(times[0]) == pytest.approx(999.0, abs=1e-9) and float(times[-1]) == pytest.approx(-1.0, abs=1e-9)
        gap = float((times[:-1] - times[1:]).min())
        assert float((taus - times).abs().max()) <= 0.5 * gap + 1e-9
        assert float(taus[0]) == float(times[0]) and float(taus[-1]) == float(times[-1])
    # the initial parameters (xi = 1, eta = 0) give the uniform grid and no decoupling
    times, taus = ld3.ld3_times(torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64), 999.0, -1.0)
    assert torch.allclose(times, torch.linspace(999.0, -1.0, 6, dtype=torch.float64))
    assert torch.equal(times, taus)


def test_ld3_round_grid_gives_distinct_descending_integers():
    out = ld3.round_grid([999.0, 500.4, 500.2, 0.3, -1.0])
    assert out["grid"] == [999, 500, 499, 0]
    assert out["max_abs_change"] == pytest.approx(1.2)


@pytest.mark.parametrize("family", ["ddim", "dpmpp"])
def test_continuous_sampler_matches_the_package_scheduler_on_an_integer_grid(family):
    torch.set_num_threads(1)
    from benchmarks.evaluation import generate, seeded_noise
    from benchmarks.families import make_scheduler, tuned_taus
    from benchmarks.grid_side_by_side import build_scheduler
    from benchmarks.testbeds import load_testbed

    tb = load_testbed("gmm", torch.device("cpu"))
    grid = [999, 722, 302, 30, 0]
    taus = [999.0, 725.5, 299.0, 33.3, 2.5]  # a tau table that differs from tau = t
    sched, timesteps = build_scheduler(family, tb.noise_config, 5, grid, taus)
    assert timesteps == grid
    ref = generate(tb, sched, None, 8, 0, "cpu", family=family, timesteps=timesteps)
    # the custom grid carried the table: the network saw the taus, the solver stepped on the grid
    assert [int(t) for t in sched.grid_timesteps] == grid
    assert [float(t) for t in sched.timesteps] == pytest.approx(taus) and tuned_taus(sched, 5) == pytest.approx(taus)
    den = tb.denoiser()
    schedule = ContinuousSchedule.from_scheduler(make_scheduler("ddim", tb.noise_config))
    out = sample(lambda x, t: den(x, torch.as_tensor(t, dtype=torch.float32), None),
                 seeded_noise(8, tb.sample_shape, 0), torch.tensor(grid + [-1.0], dtype=torch.float64),
                 torch.tensor(taus, dtype=torch.float64), family, schedule)
    # float64 arithmetic here vs float32 in the schedulers: agreement to ~1e-5 on samples of size ~1
    assert torch.allclose(out, ref, atol=1e-4)


def test_harness_runs_end_to_end(tmp_path):
    from benchmarks import grid_side_by_side as gsb

    # calibrate(tune=...) itself is tested in tests/test_grid_tuning.py; here the harness and the peers
    gsb.main(["--quick", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path), "--testbeds", "gmm",
              "--methods", "untuned", "hand_grid", "tau", "gits", "ld3", "dmn"])
    payload = json.loads((tmp_path / "grid_side_by_side.json").read_text())
    cell = payload["results"]["cells"]["gmm"]["ddim@5"]
    for method in ("untuned", "hand_grid", "tau", "gits", "ld3", "dmn"):
        assert np.isfinite(cell[method]["metrics"]["fd"]), method
    assert cell["untuned"]["gap_closed_fd"] == 0.0
    assert len(cell["gits"]["grid_used"]) == 5 and cell["gits"]["grid_used"] == cell["gits"]["grid"]
    assert cell["ld3"]["taus_used"] == pytest.approx(cell["ld3"]["taus"], abs=1e-3)
    # DMN is data-free: no network evaluation, its grid sampled as given
    assert cell["dmn"]["cost"]["forward"] == 0 and cell["dmn"]["grid_used"] == cell["dmn"]["grid"]
    assert (tmp_path / "grid_side_by_side.md").exists() and (tmp_path / "grid_side_by_side.png").exists()


def test_guard_check_finds_the_cells_where_the_guard_refused_the_learned_grid(tmp_path):
    from benchmarks import grid_guard_check as ggc
    from benchmarks import grid_side_by_side as gsb

    args = ggc.parse_args(["--medium", "--out-dir", str(tmp_path)])
    sargs = ggc.side_by_side_args(args)
    cache = Path(sargs.cache_dir_resolved)
    cache.mkdir(parents=True)
    default, learned = [999, 799, 599, 400, 200], [802, 556, 425, 293, 100]

    def put(cell, method, grid, taus=None):
        entry = {"metrics": {"fd": 1.0}, "grid_used": grid, "taus_used": taus or [float(t) for t in grid], "seed": 0}
        gsb.cache_path(cache, sargs, ("mnist",) + cell, method).write_text(json.dumps(entry))

    put(("dpmpp", 5), "untuned", default)
    put(("dpmpp", 5), "grid", default)  # the guard fell back: the untuned grid, tau = t
    put(("dpmpp", 10), "untuned", default)
    put(("dpmpp", 10), "grid", default, taus=[990.0, 800.0, 600.0, 400.0, 200.0])  # refused grid, tau fallback shipped
    put(("ddim", 5), "untuned", default)
    put(("ddim", 5), "grid", learned)  # the guard kept the learned grid
    put(("unipc", 5), "grid", default)  # no untuned result: nothing to compare with
    assert ggc.refused_cells(sargs) == ["dpmpp@5", "dpmpp@10"]
    # named cells are checked before any work: a malformed one, then one the side-by-side has not measured
    with pytest.raises(ValueError, match="SAMPLER@NFE"):
        ggc.parse_cells(sargs, ["dpmpp@5", "dpmpp5"])
    with pytest.raises(ValueError, match="mnist:unipc@5"):
        ggc.parse_cells(sargs, ["dpmpp@5", "unipc@5"])
    assert [c[:3] for c in ggc.parse_cells(sargs, ["ddim@5"])] == [("ddim@5", "ddim", 5)]


def test_guard_check_refuses_sizes_the_side_by_side_did_not_measure(tmp_path):
    from benchmarks import grid_guard_check as ggc

    with pytest.raises(ValueError, match="--medium"):
        ggc.side_by_side_args(ggc.parse_args(["--quick", "--out-dir", str(tmp_path)]))
