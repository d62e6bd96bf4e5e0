"""CI smoke run of the flow-matching benchmarks (flow GMM quality vs NFE, SD3 / Flux inference overhead) at --quick
sizes: each writes its JSON / Markdown / PNG with finite numbers and the fields the README quotes. The figures are
not checked here (tiny sizes); the committed results are."""

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` lives at the repository root, next to src/
    sys.path.insert(0, str(REPO))

pytest.importorskip("sklearn", reason="the testbeds need scikit-learn (pip install diffusers-timetuner[test])")


def _numbers(obj):
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def _run(module, tmp_path):
    module.main(module.parse_args(["--quick", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path)]))
    payload = json.loads((tmp_path / f"{module.NAME}.json").read_text())
    assert (tmp_path / f"{module.NAME}.md").exists() and (tmp_path / f"{module.NAME}.png").exists()
    assert all(math.isfinite(v) for v in _numbers(payload["results"]))
    assert payload["command"] and payload["versions"]["diffusers"]
    return payload["results"]


@pytest.mark.slow
def test_flow_gmm_quick(tmp_path):
    from benchmarks import flow_gmm

    res = _run(flow_gmm, tmp_path)
    cells = {(c["family"], c["nfe"]): c for c in res["cells"]}
    assert set(cells) == {("flow_euler", 5), ("unipc_flow", 5)}
    assert "teacher_local" in cells[("flow_euler", 5)]["tuned"]
    assert res["floor"]["fd"] > 0 and res["fd_exact_vs_exact"] > 0


@pytest.mark.slow
def test_inference_overhead_flow_quick(tmp_path):
    from benchmarks import inference_overhead_flow

    res = _run(inference_overhead_flow, tmp_path)
    assert set(res["pipelines"]) == {"sd3", "flux", "sd3_realistic", "flux_realistic"}  # the tiny scale always
    for key, r in res["pipelines"].items():
        assert len(r["paired_ratios"]) == res["settings"][r["scale"]]["reps"]
        lo, hi = r["paired_ratio_ci95"]
        assert lo <= r["median_paired_ratio"] <= hi
        assert r["taus"] != r["grid"]  # the tuned variant really ran a table


def test_trajectory_error_flow_quick(tmp_path):
    from benchmarks import trajectory_error_flow

    res = _run(trajectory_error_flow, tmp_path)
    panels = res["panels"]
    assert set(panels) == {"flow_gmm/flow_euler", "flow_gmm/unipc_flow", "gmm/heun", "mnist_flow/flow_euler"}
    for key, cells in panels.items():
        for c in cells:
            # one error per grid state s_K..s_1 plus the final sample (Heun: n steps, n grid times)
            assert len(c["untuned"]) == len(c["sigmas"]) == c["steps"] + 1
            assert c["untuned"][0] < 1e-9  # the same x_T: no error at the first state
            # the refined reference is far closer to the ODE than the few-step sampler is
            assert c["reference"]["extrapolated_endpoint_change"] < 0.2 * c["untuned"][-1]
            for errs in c["tuned"].values():
                assert len(errs) == len(c["untuned"])
    euler = panels["flow_gmm/flow_euler"][0]
    # a real table (not tau = t): in this seeded quick run the endpoint table lowers the endpoint error by ~30%
    assert not euler["identity"]["endpoint"]
    assert euler["tuned"]["endpoint"][-1] < euler["untuned"][-1]


def test_trajectory_error_flow_takes_heuns_corrected_states():
    from benchmarks.trajectory_error_flow import grid_states

    # Heun at 3 steps: timesteps [t0, t1, t1, t2, t2], sigmas [s0, s1, s1, s2, s2, 0]; the loop's states are x_T and
    # the output of each evaluation: predictor at s1, corrected s1, predictor at s2, corrected s2, final (Euler to 0).
    states = ["x_T", "pred_s1", "corr_s1", "pred_s2", "corr_s2", "final"]
    picked, sigmas = grid_states(states, [999.0, 500.0, 500.0, 100.0, 100.0], [80.0, 5.0, 5.0, 0.5, 0.5, 0.0])
    assert picked == ["x_T", "corr_s1", "corr_s2", "final"]
    assert sigmas == [80.0, 5.0, 0.5, 0.0]
    # one evaluation per step (Euler, UniPC): every state is a grid state
    picked, sigmas = grid_states(["a", "b", "c"], [1000.0, 500.0], [1.0, 0.5, 0.0])
    assert picked == ["a", "b", "c"] and sigmas == [1.0, 0.5, 0.0]
