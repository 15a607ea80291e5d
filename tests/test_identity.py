"""Run identity (issue 33): a stored result is reused, a run resumed or a study joined only for the same
settings, data and split, and never across MLflow stores. One test per reuse path against a temporary
SQLite store (no training), and a scan of flame_kd/ that fails when a new lookup leaves the data out."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from flame_kd import identity, tracking
from flame_kd.config import to_dict
from flame_kd.study_config import AblationSpec, ParetoConfig, SweepConfig
from flame_kd.errors import ConfigError
from flame_kd.identity import RunIdentity

from pipeline_helpers import REPO, TINY_TEACHER, distill_cfg, use_store

A = RunIdentity("cfg000000000", "data_aaaaaaa", "split_aaaaaa")
OTHER_DATA = RunIdentity(A.config, "data_bbbbbbb", A.split)
OTHER_SPLIT = RunIdentity(A.config, A.data, "split_bbbbbb")


def fake_data(ident: RunIdentity) -> SimpleNamespace:
    """What the lookups read of a loaded data set: its digest and its split's."""
    return SimpleNamespace(digest=ident.data, split=SimpleNamespace(digest=ident.split))


def make_run(tags: dict, status: str = "FINISHED", experiment: str = "identity") -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, tags={k: str(v) for k, v in tags.items()})
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> str:
    """One SQLite store for the module (a new store migrates its schema: seconds); each test's runs
    carry identities of their own (``ids``), so no test sees another's."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def store(tmp_path, monkeypatch, shared_store) -> str:
    use_store(tmp_path, monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared_store)
    mlflow.set_tracking_uri(shared_store)
    tracking.configure()
    return shared_store


@pytest.fixture
def ids(request) -> SimpleNamespace:
    """A, and A with other data, another split, other settings: digests unique to the test."""
    config = identity.digest_of(request.node.nodeid)
    a = RunIdentity(config, f"d{config[:11]}", f"s{config[:11]}")
    return SimpleNamespace(A=a, OTHER_DATA=RunIdentity(config, f"e{config[:11]}", a.split),
                           OTHER_SPLIT=RunIdentity(config, a.data, f"t{config[:11]}"),
                           OTHER_CONFIG=RunIdentity(identity.digest_of(config), a.data, a.split))


def other_pixels(folder: Path) -> None:
    """Darken five RGB frames in place: the same names and labels, another data digest."""
    for path in sorted((folder / "254p RGB Images").iterdir())[:5]:
        with Image.open(path) as im:
            Image.eval(im.convert("RGB"), lambda v: v // 2).save(path, format="JPEG")


# --- the rule itself --------------------------------------------------------------------------------


def test_an_identity_is_settings_data_and_split(store, ids):
    A, OTHER_DATA, OTHER_SPLIT, OTHER_CONFIG = ids.A, ids.OTHER_DATA, ids.OTHER_SPLIT, ids.OTHER_CONFIG
    assert len({A.digest, OTHER_DATA.digest, OTHER_SPLIT.digest, OTHER_CONFIG.digest}) == 4
    runs = {i: make_run(i.tags()) for i in (A, OTHER_DATA, OTHER_SPLIT, OTHER_CONFIG)}
    found = [r.info.run_id for r in tracking.search_runs(identity.where(A))]
    assert found == [runs[A]]
    assert identity.same_data(A.tags(), A.data, A.split) and not identity.same_data(A.tags(), A.data, "x")
    with pytest.raises(ConfigError) as err:
        identity.refuse_other_data("run r", OTHER_DATA.tags(), A)
    assert OTHER_DATA.data in err.value.message and A.data in err.value.message and "\n" not in err.value.message


# --- each reuse path --------------------------------------------------------------------------------


def test_teacher_lookup_needs_the_same_data_and_split(store, ids):
    A, OTHER_DATA, OTHER_SPLIT = ids.A, ids.OTHER_DATA, ids.OTHER_SPLIT
    from flame_kd.runs.distill import find_teacher_run, teacher_config
    from flame_kd.runs.skeleton import config_digest

    cfg = distill_cfg("x.csv")
    ident = RunIdentity(config_digest(to_dict(teacher_config(cfg))), A.data, A.split)
    run = make_run({"flame_kd.stage": "teacher", **ident.tags()})
    assert find_teacher_run(cfg, fake_data(ident)) == run
    assert find_teacher_run(cfg, fake_data(OTHER_DATA)) is None
    assert find_teacher_run(cfg, fake_data(OTHER_SPLIT)) is None


def test_cached_teacher_outputs_are_never_used_for_other_data():
    from flame_kd.teacher_cache import artifact_name, matches

    stored = {"teacher_run_id": "t", "ids": [], "data_digest": A.data, "split_digest": A.split}
    assert matches(stored, "t", fake_data(A))
    assert not matches(stored, "t", fake_data(OTHER_DATA)) and not matches(stored, "t", fake_data(OTHER_SPLIT))
    assert artifact_name(32, A.data, A.split) != artifact_name(32, OTHER_DATA.data, A.split)


def test_resume_continues_only_a_run_of_the_same_data(store, ids, tmp_path):
    """Review: `teacher --resume true` with another --data continued the first data's run."""
    A, OTHER_DATA, OTHER_SPLIT = ids.A, ids.OTHER_DATA, ids.OTHER_SPLIT
    from flame_kd.runs.skeleton import checkpoint_dir, find_resumable

    run = make_run({"flame_kd.stage": "teacher", **A.tags()}, status="FAILED")
    base = str(tmp_path / "ckpt")
    checkpoint_dir(run, base).mkdir(parents=True)
    (checkpoint_dir(run, base) / "last.pt").write_bytes(b"x")
    found = find_resumable(A, base)
    assert found is not None and found[0] == run
    found[1].release(force=True)
    assert find_resumable(OTHER_DATA, base) is None  # an internal resume (a grid cell) starts afresh
    with pytest.raises(ConfigError) as err:  # the user's own --resume: one line naming both digests
        find_resumable(OTHER_DATA, base, asked=True)
    assert run in err.value.message and A.data in err.value.message and OTHER_DATA.data in err.value.message
    assert find_resumable(OTHER_SPLIT, base) is None


@pytest.mark.slow
def test_teacher_resume_on_other_data_is_refused_before_training(store, synth_copy):
    """Review: `teacher --resume true` with another --data continued the run trained on the first data."""
    from flame_kd.engine import LambdaCallback
    from flame_kd.runs.teacher import run_teacher

    from pipeline_helpers import teacher_cfg

    def interrupt(epoch, metrics, state):
        raise KeyboardInterrupt

    cfg = teacher_cfg(str(synth_copy / "flame2.csv"), epochs=2, experiment="identity-resume")
    cfg.tracking.log_model = False
    with pytest.raises(KeyboardInterrupt):
        run_teacher(cfg, callbacks=[LambdaCallback(interrupt)])
    (killed,) = tracking.search_runs("attributes.status = 'KILLED'", experiment="identity-resume")
    other = Path(shutil.copytree(synth_copy, synth_copy.parent / "other"))
    other_pixels(other)
    cfg.data.csv, cfg.resume = str(other / "flame2.csv"), True
    with pytest.raises(ConfigError) as err:
        run_teacher(cfg)
    message = err.value.message
    assert killed.info.run_id in message and killed.data.tags[identity.DATA_TAG] in message
    assert "this run uses data" in message and "\n" not in message
    assert len(tracking.search_runs("", experiment="identity-resume")) == 1  # nothing started, nothing trained


def grid_spec(csv: str, **kw) -> AblationSpec:
    from flame_kd.runs.ablation import spec_from_dict

    base = dict(name="unit", data={"csv": csv, "image_size": 32}, teachers=[TINY_TEACHER], losses=["bce"],
                seeds=[1], control=False, pretrained=False, device="cpu", experiment="identity", log_model=False)
    return spec_from_dict(base | kw)


def test_an_ablation_rerun_on_other_data_gets_its_own_parent(store, synth_copy, monkeypatch):
    """Review: the same spec with --data other.csv said "1 cells finished, 0 to run" and reported the
    first data set's results."""
    from flame_kd.runs import ablation, grid

    ran = []

    def cell(spec, parent, teacher, loss, seed, **_):  # what run_cell leaves behind: a finished cell
        ran.append(parent)
        return make_run({"mlflow.parentRunId": parent, "flame_kd.cell": f"{teacher}|{loss}|{seed}"})

    monkeypatch.setattr(ablation, "run_cell", cell)
    monkeypatch.setattr(ablation, "write_summary", lambda parent: None)
    csv = str(synth_copy / "flame2.csv")
    first = grid.run_ablation(grid_spec(csv))
    assert grid.run_ablation(grid_spec(csv)) == first and ran == [first]  # same data: nothing to run
    other = Path(shutil.copytree(synth_copy, synth_copy.parent / "other"))
    other_pixels(other)
    second = grid.run_ablation(grid_spec(str(other / "flame2.csv")))
    assert second != first and ran == [first, second]
    tags = MlflowClient().get_run(second).data.tags
    assert tags[identity.DATA_TAG] != MlflowClient().get_run(first).data.tags[identity.DATA_TAG]


def test_the_shared_grid_is_one_study_per_data_and_store(store, ids, tmp_path):
    A, OTHER_DATA = ids.A, ids.OTHER_DATA
    from flame_kd.runs import grid

    spec = grid_spec("x.csv", heartbeat=1)
    ident = RunIdentity(spec.digest(), A.data, A.split, config_tag="flame_kd.spec_digest")
    other = RunIdentity(spec.digest(), OTHER_DATA.data, A.split, config_tag="flame_kd.spec_digest")
    assert grid.study_name(spec, ident) != grid.study_name(spec, other)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    _, _, parent = grid.open_grid(spec, url, ident)
    assert MlflowClient().get_run(parent).data.tags[identity.DATA_TAG] == A.data
    assert grid.open_grid(spec, url, ident)[2] == parent
    study = optuna.load_study(study_name=grid.study_name(spec, ident), storage=url)
    study.set_user_attr(grid.PARENT_ATTR, "0123456789abcdef0123456789abcdef")  # as made against another store
    with pytest.raises(ConfigError, match="belongs to another store"):
        grid.open_grid(spec, url, ident)


def test_default_storages_differ_per_store():
    """Review: two MLflow stores in one folder shared optuna.db; the second failed "Run ... not found"."""
    from flame_kd.studies import default_storage

    a, b = default_storage("sqlite:///x/mlflow.db"), default_storage("sqlite:///x/other.db")
    assert a != b and a.startswith("sqlite:///x/optuna-") and b.startswith("sqlite:///x/optuna-")
    assert default_storage("http://u:one@h:5000") == default_storage("http://u:two@h:5000")  # credentials aside
    assert default_storage("http://h:5000") != default_storage("http://g:5000")


def test_a_sweep_on_other_data_has_its_own_default_study(store, ids, tmp_path):
    """Review: a sweep on other data joined the first one's `<teacher>-<loss>-s<seed>` study."""
    A, OTHER_DATA = ids.A, ids.OTHER_DATA
    from flame_kd.runs.sweep import open_study, sweep_identity

    cfg = SweepConfig(distill=distill_cfg("x.csv"))
    ident, other = sweep_identity(cfg, fake_data(A), "t1"), sweep_identity(cfg, fake_data(OTHER_DATA), "t1")
    assert ident != other and identity.study_name("p", ident) != identity.study_name("p", other)
    assert sweep_identity(cfg, fake_data(A), "t2") != ident  # another teacher: another study
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    cfg.study_name = "named"
    study, created = open_study(cfg, storage, 0, ident)
    assert created and study.user_attrs[identity.STUDY_ATTR]["data"] == A.data
    assert open_study(cfg, storage, 0, ident)[1] is False
    with pytest.raises(ConfigError) as err:
        open_study(cfg, storage, 0, other)
    assert A.data in err.value.message and OTHER_DATA.data in err.value.message


def test_a_named_study_of_other_data_is_refused_before_any_teacher(store, ids, tmp_path, synth_csv):
    """`sweep --study-name X` on other data: one line naming both digests, exit 2, no teacher trained."""
    A = ids.A
    from flame_kd.cli import main

    teachers = len(tracking.search_runs("tags.`flame_kd.stage` = 'teacher'"))
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="mine", storage=storage)
    study.set_user_attr(identity.STUDY_ATTR, identity.study_record(A))
    result = CliRunner().invoke(main, ["sweep", "--data", str(synth_csv), "--study-name", "mine", "--storage", storage,
                                       "--teacher", TINY_TEACHER, "--image-size", "32", "--device", "cpu",
                                       "--loss", "kl_bce", "--experiment", "identity"])
    assert result.exit_code == 2, result.output
    line = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert len(line) == 1 and "study mine belongs to other data" in line[0] and A.data in line[0]
    assert "Traceback" not in result.output
    assert len(tracking.search_runs("tags.`flame_kd.stage` = 'teacher'")) == teachers  # none trained


def test_a_named_study_from_before_records_is_judged_by_its_parent(store, ids, tmp_path):
    A, OTHER_DATA = ids.A, ids.OTHER_DATA
    from flame_kd.runs.sweep import PARENT_ATTR, named_study_check

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="old", storage=storage)
    study.set_user_attr(PARENT_ATTR, make_run({"flame_kd.stage": "sweep", **A.tags()}))
    check = named_study_check(SweepConfig(study_name="old"), storage)
    check(fake_data(A))
    with pytest.raises(ConfigError, match="belongs to other data"):
        check(fake_data(OTHER_DATA))
    study.set_user_attr(PARENT_ATTR, "0123456789abcdef0123456789abcdef")  # a parent of another store
    with pytest.raises(ConfigError, match="belongs to another store"):
        check(fake_data(A))


def test_a_pareto_study_on_other_data_gets_its_own_parent(store, synth_copy):
    from flame_kd.runs.pareto import find_or_create_parent, study_identity

    cfg = ParetoConfig(distill=distill_cfg(str(synth_copy / "flame2.csv")))
    ident = study_identity(cfg)
    parent = find_or_create_parent(cfg, ident)
    assert find_or_create_parent(cfg, ident) == parent
    other_pixels(synth_copy)
    other = study_identity(cfg)
    assert other.data != ident.data and other.config == ident.config
    assert find_or_create_parent(cfg, other) != parent


def test_the_champion_never_compares_across_data(store, ids, monkeypatch):
    A, OTHER_DATA = ids.A, ids.OTHER_DATA
    from flame_kd.reports import champion

    champ = make_run({**A.tags()})
    monkeypatch.setattr(tracking, "model_version_by_alias", lambda name, alias: SimpleNamespace(version="1", run_id=champ))
    moved = []
    monkeypatch.setattr(tracking, "set_model_alias", lambda *a: moved.append(a))
    assert champion.crown("m", "2", "r", "val/f1_macro", 0.99, OTHER_DATA.data, OTHER_DATA.split) is False
    assert moved == []
    mlflow.MlflowClient().log_metric(champ, "val_best_f1_macro", 0.5)
    assert champion.crown("m", "2", "r", "val/f1_macro", 0.99, A.data, A.split) is True and moved


# --- the guard: a new reuse path that forgets the data fails here ----------------------------------

LOOKUPS = {"search_runs", "create_study", "load_study", "list_artifacts", "model_version_by_alias"}

# Lookups that decide no reuse, each with the reason (module path, top-level function).
NOT_REUSE = {
    ("flame_kd/tracking/queries.py", "search_runs"): "the wrapper every search goes through",
    ("flame_kd/tracking/queries.py", "list_artifacts"): "the wrapper every listing goes through",
    ("flame_kd/tracking/liveness.py", "reap_lost_runs"): "ends runs of dead processes; reuses nothing",
    ("flame_kd/runs/ablation.py", "collect_runs"): "a report of runs the user filters",
    ("flame_kd/runs/grid.py", "end_lost_runs"): "ends a dead worker's runs under the parent",
    ("flame_kd/runs/grid.py", "do_task"): "a finished cell under the parent found by identity",
    ("flame_kd/runs/pareto.py", "student_runs"): "children of a parent found by identity",
    ("flame_kd/runs/sweep.py", "_tag_last_trial"): "tags a trial run under the study's parent",
    ("flame_kd/runs/distill.py", "nearest_teacher"): "a message naming what differs; reuses nothing",
    ("flame_kd/runs/compare.py", "_read_csv_artifact"): "reads the runs the user named to compare",
    ("flame_kd/runs/serve.py", "resolve_model_uri"): "serves the version an alias names; compares nothing",
    ("flame_kd/runs/pareto.py", "register_best"): "the alias follows the newest study's best; compares nothing",
}


def _names(node: ast.AST) -> set[str]:
    """``identity.<name>`` attributes used under ``node``."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "identity"}


def _functions(tree: ast.Module) -> dict[str, ast.AST]:
    """Top-level functions and methods (``Class.method``) of a module."""
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out |= {f"{node.name}.{m.name}": m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return out


def _aware(funcs: dict[str, ast.AST]) -> set[str]:
    """Functions that use the identity module, directly or through a function of the same module."""
    aware = {name for name, fn in funcs.items() if _names(fn)}
    while True:
        more = {name for name, fn in funcs.items() if name not in aware and any(
            isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in aware for c in ast.walk(fn))}
        if not more:
            return aware
        aware |= more


def reuse_violations(source: str, path: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(problems, (path, function) of every lookup seen) of one module's source."""
    problems, seen = [], []
    funcs = _functions(ast.parse(source))
    aware = _aware(funcs)
    for name, fn in funcs.items():
        for call in (c for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                     and c.func.attr in LOOKUPS):
            seen.append((path, name))
            if (path, name) in NOT_REUSE:
                continue
            where = f"{path}:{call.lineno} {name}: {c_name(call)}"
            if call.func.attr == "search_runs":
                arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "filter_string"), None)
                used = _names(arg) if arg is not None else set()
                if "where" in used:
                    continue
                if "where_config" in used and "refuse_other_data" in _names(fn):
                    continue  # a search for a conflict, to refuse it
                problems.append(f"{where}: filter not built by identity.where (the data would be left out)")
            elif call.func.attr in ("create_study", "load_study"):
                # a study made records its identity; one opened (or made if it exists) is checked against it
                needs = {"create_study": {"study_record"}, "load_study": {"check_study"}}[call.func.attr]
                if any(k.arg == "load_if_exists" for k in call.keywords):
                    needs = needs | {"check_study"}
                if not needs <= _names(fn):
                    problems.append(f"{where}: study opened without identity.study_record / identity.check_study")
            elif name not in aware:
                problems.append(f"{where}: a stored result chosen without the identity module")
    return problems, seen


def c_name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def test_every_reuse_lookup_goes_through_the_identity():
    problems, seen = [], []
    for path in sorted((REPO / "flame_kd").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        p, s = reuse_violations(path.read_text(), rel)
        problems += p
        seen += s
    assert not problems, "\n".join(problems)
    must = {("flame_kd/runs/distill.py", "find_teacher_run"), ("flame_kd/runs/skeleton.py", "find_resumable"),
            ("flame_kd/runs/ablation.py", "find_or_create_parent"), ("flame_kd/runs/pareto.py", "find_or_create_parent"),
            ("flame_kd/runs/sweep.py", "open_study"), ("flame_kd/runs/grid.py", "open_grid"),
            ("flame_kd/teacher_cache.py", "load_or_compute"), ("flame_kd/reports/champion.py", "crown")}
    assert must <= set(seen), must - set(seen)  # the scan sees the known paths
    stale = set(NOT_REUSE) - set(seen)
    assert not stale, f"NOT_REUSE lists lookups that no longer exist: {stale}"


@pytest.mark.parametrize("source", [
    'def find_old(d):\n    return tracking.search_runs(f"tags.`flame_kd.config_digest` = \'{d}\'")\n',
    'def find_new(ident):\n    return tracking.search_runs(identity.where_config(ident))\n',
    'def join(name, storage):\n    return optuna.load_study(study_name=name, storage=storage)\n',
    'def cached(run):\n    return [p for p in tracking.list_artifacts(run, "teacher_outputs")]\n',
])
def test_the_scan_catches_a_lookup_that_leaves_the_data_out(source):
    problems, _ = reuse_violations(source, "flame_kd/runs/new.py")
    assert len(problems) == 1
