"""Hub distribution against local servers: uploads through the real huggingface_hub client to the upload test double
(tests/hub_server/upload_server.py), downloads through a real `olah` (offline mode) serving the same git repos.

Which Hub call is covered where: see the `covers:` line in each test's docstring.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from hub_server.fixtures import hub_env, hub_servers  # noqa: F401  (pytest fixtures)
from hub_server.olah import free_loopback_port
from hub_server.outputs import MODEL_ID, make_calibration_output, sample, tiny_pipeline, tuned_scheduler
from hub_server.upload_server import _GitRepo

from diffusers_timetuner.hub import check_can_push, load_tuned_scheduler, push_tuned_schedule
from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

pytestmark = [
    pytest.mark.hub,
    # diffusers 0.42.1's load_config still passes this deprecated argument to hf_hub_download; not ours to fix
    pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated:UserWarning"),
]

_counter = iter(range(10_000))


def _new_repo_id() -> str:
    return f"tt-org/schedule-{next(_counter)}"


def _mirror(servers, repo_id) -> _GitRepo:
    return _GitRepo(os.path.join(servers.mirrors_path, "models", repo_id))


def _public(config) -> dict:
    # loading adds bookkeeping keys (`_use_default_values`, `_name_or_path`); compare the scheduler's own keys
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _push(servers, hub_env, out_dir, repo_id, **kwargs):
    hub_env.use(servers.upload.url)
    hub_env.login()
    return push_tuned_schedule(out_dir, repo_id, **kwargs)


def test_push_is_one_commit_with_diffusers_layout_and_model_card(hub_servers, hub_env, tmp_path):
    """covers: HfApi.repo_exists, create_repo, create_commit (preupload + NDJSON commit) -> upload double;
    ModelCard metadata read back through olah (hf_hub_download of README.md)."""
    from huggingface_hub import ModelCard, hf_hub_download

    out = make_calibration_output(str(tmp_path / "out"))
    repo_id = _new_repo_id()
    info = _push(hub_servers, hub_env, out, repo_id)

    repo = _mirror(hub_servers, repo_id)
    assert info.oid == repo.head("main")
    # initial commit (made by create_repo, as on the Hub) + exactly one upload commit
    assert len(repo.git("rev-list", "main").splitlines()) == 2
    assert sorted(repo.files("main")) == sorted(
        [".gitattributes", "README.md", "calibration.png", "report.json", "scheduler/scheduler_config.json"]
    )
    commits = [p for m, p in hub_servers.upload.state.requests if m == "POST" and "/commit/" in p]
    assert commits == [f"/api/models/{repo_id}/commit/main"]
    # the pushed config is byte-identical to the calibration output
    pushed = repo.git("show", "main:scheduler/scheduler_config.json")
    with open(os.path.join(out, "scheduler_config.json")) as f:
        assert json.loads(pushed) == json.load(f)

    hub_env.use(hub_servers.olah.url)
    card = ModelCard.load(hf_hub_download(repo_id, "README.md"))
    assert card.data.library_name == "diffusers"
    assert card.data.tags == ["timetuner", "scheduler"]
    assert card.data.base_model == MODEL_ID  # recorded model id is Hub-shaped and not a local path
    text = card.text
    assert f'TimeTunerDDIMScheduler.from_pretrained("{repo_id}", subfolder="scheduler")' in text
    assert "endpoint_mse: 0.02 -> 0.015 (-25.0%)" in text  # the fixture's held-out numbers (outputs.py)
    # t_K = 750: DDIM leading spacing, 4 of 1000 steps; r = 1.0125 = 1 + 0.05 * 1/4 (outputs.tuned_scheduler)
    assert "| 0 | 750 | 759.3750 | 1.0125 |" in text


def test_round_trip_push_pull_gives_identical_sampling(hub_servers, hub_env, tmp_path):
    """covers: push (upload double) -> TimeTunerDDIMScheduler.from_pretrained(repo, subfolder="scheduler") and
    load_tuned_scheduler(repo) (hf_hub_download HEAD/GET resolve) -> olah; then HF_HUB_OFFLINE=1 from the cache,
    in-process and in a fresh subprocess that only has the environment variables."""
    local = tuned_scheduler()
    out = make_calibration_output(str(tmp_path / "out"), local)
    repo_id = _new_repo_id()
    _push(hub_servers, hub_env, out, repo_id)

    hub_env.use(hub_servers.olah.url)
    pulled = TimeTunerDDIMScheduler.from_pretrained(repo_id, subfolder="scheduler")
    helper = load_tuned_scheduler(repo_id)
    assert type(helper) is TimeTunerDDIMScheduler
    assert _public(pulled.config) == _public(local.config) == _public(helper.config)

    pipe = tiny_pipeline()
    reference = sample(pipe, local)
    assert torch.equal(sample(pipe, pulled), reference)
    assert torch.equal(sample(pipe, helper), reference)
    untuned = sample(pipe, TimeTunerDDIMScheduler.from_config(
        {**local.config, "tuned_timesteps": None, "tuned_grids": None, "tuning_info": None}))
    assert not torch.allclose(untuned, reference)  # the table really changes what the network sees

    # offline with the filled cache: in-process ...
    hub_env.offline()
    offline = load_tuned_scheduler(repo_id)
    assert torch.equal(sample(pipe, offline), reference)
    # ... and a fresh process that only gets the environment (HF_ENDPOINT points at a closed port to prove no call)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{free_loopback_port()}",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    code = (
        "import json;from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler as S;"
        f"s=S.from_pretrained('{repo_id}', subfolder='scheduler');s.set_timesteps(4);"
        "print(json.dumps([float(t) for t in s.timesteps]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    local.set_timesteps(4)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [float(t) for t in local.timesteps]


def test_private_branch_and_commit_message(hub_servers, hub_env, tmp_path):
    """covers: create_repo(private=True), create_branch(exist_ok=True), create_commit(revision=branch,
    commit_message) -> upload double; from_pretrained(revision=branch) -> olah."""
    out = make_calibration_output(str(tmp_path / "out"), report=False, plot=False)
    repo_id = _new_repo_id()
    _push(hub_servers, hub_env, out, repo_id, private=True, revision="tuned-v2", commit_message="my tables")

    repo = _mirror(hub_servers, repo_id)
    assert hub_servers.upload.state.private[repo_id] is True
    assert repo.git("log", "-1", "--format=%s", "tuned-v2") == "my tables"
    assert repo.files("main") == [".gitattributes"]  # main untouched
    assert sorted(repo.files("tuned-v2")) == [".gitattributes", "README.md", "scheduler/scheduler_config.json"]

    hub_env.use(hub_servers.olah.url)
    scheduler = load_tuned_scheduler(repo_id, revision="tuned-v2")
    assert scheduler.config.tuned_timesteps == tuned_scheduler().config.tuned_timesteps
    with pytest.raises(ValueError, match="exists but has no scheduler/scheduler_config.json"):
        load_tuned_scheduler(repo_id)  # main has no table


def test_push_without_token_fails_before_any_request(hub_servers, hub_env, tmp_path):
    """covers: token check (get_token) before HfApi is used; no request reaches the double."""
    out = make_calibration_output(str(tmp_path / "out"))
    hub_env.use(hub_servers.upload.url)
    before = len(hub_servers.upload.state.requests)
    with pytest.raises(ValueError, match=r"huggingface-cli login.*HF_TOKEN"):
        push_tuned_schedule(out, _new_repo_id())
    with pytest.raises(ValueError, match=r"huggingface-cli login.*HF_TOKEN"):
        check_can_push(_new_repo_id())  # what a calibration script calls before calibrating
    with pytest.raises(ValueError, match="repo_id must look like 'ORG/NAME'"):
        check_can_push("no-namespace", token="x")
    assert len(hub_servers.upload.state.requests) == before


def test_failed_commit_uploads_nothing_and_says_what_is_left(hub_servers, hub_env, tmp_path):
    """covers: create_commit failing server-side (HTTP 500 from the double) for a new and for an existing repo."""
    out = make_calibration_output(str(tmp_path / "out"))
    hub_servers.upload.state.fail_commit_with = 500
    try:
        new_id = _new_repo_id()
        with pytest.raises(RuntimeError, match="nothing was uploaded.*created by this call and is left empty"):
            _push(hub_servers, hub_env, out, new_id)
        assert _mirror(hub_servers, new_id).files("main") == [".gitattributes"]

        existing = _new_repo_id()
        hub_servers.upload.state.fail_commit_with = None
        _push(hub_servers, hub_env, out, existing)
        head = _mirror(hub_servers, existing).head("main")
        hub_servers.upload.state.fail_commit_with = 500
        with pytest.raises(RuntimeError, match=f"nothing was uploaded. The repo {existing} is unchanged"):
            _push(hub_servers, hub_env, out, existing)
        assert _mirror(hub_servers, existing).head("main") == head
    finally:
        hub_servers.upload.state.fail_commit_with = None


def test_rejected_card_metadata_creates_nothing(hub_servers, hub_env, tmp_path):
    """covers: ModelCard.validate (/api/validate-yaml answering 400) before create_repo -> upload double."""
    out = make_calibration_output(str(tmp_path / "out"))
    repo_id = _new_repo_id()
    hub_servers.upload.state.yaml_error = '"base_model" is not a valid model id'
    try:
        with pytest.raises(RuntimeError, match="nothing was uploaded. The repo .* is unchanged.*not a valid model id"):
            _push(hub_servers, hub_env, out, repo_id)
    finally:
        hub_servers.upload.state.yaml_error = None
    assert not os.path.exists(_mirror(hub_servers, repo_id).path)


def test_only_main_process_uploads(hub_servers, hub_env, tmp_path):
    """covers: the main-process gate (flag and accelerate-like state object); no request is sent."""
    out = make_calibration_output(str(tmp_path / "out"))
    before = len(hub_servers.upload.state.requests)
    assert _push(hub_servers, hub_env, out, _new_repo_id(), is_main_process=False) is None
    worker = type("State", (), {"is_main_process": False})()
    assert _push(hub_servers, hub_env, out, _new_repo_id(), state=worker) is None
    assert len(hub_servers.upload.state.requests) == before


def test_pull_errors_are_clear(hub_servers, hub_env, tmp_path):
    """covers: hf_hub_download of a missing repo (RepositoryNotFound) and of a missing subfolder (EntryNotFound, the
    hint listing the repo's configs via HfApi.list_repo_files), and a step count without a table (the scheduler
    raises)."""
    out = make_calibration_output(str(tmp_path / "out"))
    repo_id = _new_repo_id()
    _push(hub_servers, hub_env, out, repo_id)
    hub_env.use(hub_servers.olah.url)

    with pytest.raises(ValueError, match="'tt-org/does-not-exist' not found: no bundled entry"):
        load_tuned_scheduler("tt-org/does-not-exist")
    with pytest.raises(ValueError, match="exists but has no unet/scheduler_config.json.*scheduler/scheduler_config"):
        load_tuned_scheduler(repo_id, subfolder="unet")
    scheduler = load_tuned_scheduler(repo_id)
    with pytest.raises(ValueError, match="not for 7"):
        scheduler.set_timesteps(7)
    with pytest.raises(ValueError, match="not a bundled tuned schedule.*not an existing folder"):
        load_tuned_scheduler("no-such-name")
    hub_env.offline()
    with pytest.raises(ValueError, match=r"offline mode \(HF_HUB_OFFLINE=1\) and scheduler/scheduler_config.json"):
        load_tuned_scheduler("tt-org/never-downloaded")


@pytest.mark.slow
def test_unreachable_server_is_a_connection_error(hub_env):
    """covers: hf_hub_download against a closed loopback port (huggingface_hub retries ~20 s with backoff first)."""
    hub_env.use(f"http://127.0.0.1:{free_loopback_port()}")
    with pytest.raises(ConnectionError, match="Could not reach the Hub at http://127.0.0.1"):
        load_tuned_scheduler("tt-org/anything")


def test_push_to_unreachable_server_is_a_connection_error(hub_env, tmp_path):
    """covers: HfApi.repo_exists against a closed loopback port (fails at once, no retry loop)."""
    out = make_calibration_output(str(tmp_path / "out"))
    hub_env.use(f"http://127.0.0.1:{free_loopback_port()}")
    hub_env.login()
    with pytest.raises(ConnectionError, match="Could not reach the Hub at http://127.0.0.1.*nothing was uploaded"):
        push_tuned_schedule(out, "tt-org/x")


def test_a_table_worse_than_untuned_is_not_pushed(hub_env, tmp_path):
    """covers: the held-out guard, before any network call (no server running for this test)."""
    worse = tuned_scheduler(held_out={"endpoint_mse_tuned": 0.03, "endpoint_mse_untuned": 0.02})
    out = make_calibration_output(str(tmp_path / "out"), worse)
    hub_env.login()
    with pytest.raises(ValueError, match="worse tuned than untuned for \\[4\\] steps"):
        push_tuned_schedule(out, "tt-org/x")


def test_base_model_must_be_a_hub_id(tmp_path, hub_env):
    """covers: model-card metadata rules, checked before any network call (no server running for this test)."""
    from diffusers_timetuner.hub import build_model_card

    out = make_calibration_output(str(tmp_path / "out"))
    hub_env.login()
    with pytest.raises(ValueError, match="not a Hub model id"):
        push_tuned_schedule(out, "tt-org/x", base_model=str(tmp_path))  # a local path
    bundled = make_calibration_output(
        str(tmp_path / "bundled"), tuned_scheduler(model_id="diffusers-timetuner/bundled-mnist"), report=False)
    assert build_model_card(bundled, "tt-org/x").data.base_model is None  # bundled testbed: not on the Hub
    assert build_model_card(out, "tt-org/x", base_model="").data.base_model is None
    assert build_model_card(out, "tt-org/x").data.base_model == MODEL_ID


def test_pipeline_mismatch_is_refused(tmp_path):
    """covers: load_tuned_scheduler(pipeline=...) checks (local folder; no server involved)."""
    from diffusers import DDIMScheduler

    out = make_calibration_output(str(tmp_path / "out"))
    pipe = tiny_pipeline()
    assert load_tuned_scheduler(out, pipeline=pipe).config.tuned_timesteps  # same model, same betas: fine

    other_model = tiny_pipeline("someone/else")
    with pytest.raises(ValueError, match="model: tuned for test-org/tiny-unet, pipeline is someone/else"):
        load_tuned_scheduler(out, pipeline=other_model)
    assert load_tuned_scheduler(out, pipeline=other_model, check_model_id=False) is not None

    other_betas = tiny_pipeline()
    other_betas.scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match="betas: the table's noise schedule"):
        load_tuned_scheduler(out, pipeline=other_betas)

    other_T = tiny_pipeline()
    other_T.scheduler = DDIMScheduler(num_train_timesteps=500, beta_schedule="linear")
    with pytest.raises(ValueError, match="num_train_timesteps: table 1000, pipeline 500"):
        load_tuned_scheduler(out, pipeline=other_T)

    # a table whose recorded grid is not what the scheduler builds (e.g. edited timestep_spacing)
    cfg_path = os.path.join(out, "scheduler_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["timestep_spacing"] = "trailing"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    # the table records the spacing it was made for, so the edit is refused when the config is read
    with pytest.raises(ValueError, match="timestep_spacing: table 'leading', scheduler 'trailing'"):
        load_tuned_scheduler(out, pipeline=pipe)


@pytest.mark.parametrize("class_name", [
    "TimeTunerDDIMScheduler", "TimeTunerDDPMScheduler", "TimeTunerDPMSolverScheduler",
    "TimeTunerDPMSolverSinglestepScheduler", "TimeTunerEulerDiscreteScheduler",
])
def test_load_resolves_every_timetuner_class_from_the_config(class_name, tmp_path):
    """covers: `_class_name` -> class resolution of load_tuned_scheduler (local folder, no server)."""
    import diffusers_timetuner.schedulers as schedulers

    cls = getattr(schedulers, class_name)
    base = cls(num_train_timesteps=1000)
    base.set_timesteps(4)
    grid = [float(t) for t in base.grid_timesteps]
    taus = [min(999.0, t * 1.02) for t in grid]
    cls_tuned = base.with_tuned_timesteps(4, taus, grid=grid, info={"model_id": MODEL_ID})
    cls_tuned.save_pretrained(str(tmp_path))
    loaded = load_tuned_scheduler(str(tmp_path))
    assert type(loaded) is cls
    loaded.set_timesteps(4)
    assert torch.allclose(loaded.timesteps.double(), torch.tensor(taus, dtype=torch.float64), atol=1e-3)
