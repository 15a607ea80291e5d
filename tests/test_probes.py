"""Hostile and faulty inputs, as an unlucky or adversarial user gives them: each ends with a non-zero
exit, one ``Error:`` line naming what is wrong, no traceback, no secret in anything printed, and the
MLflow store exactly as it was. (The credential cases against a real server: test_credentials.py.)"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from PIL import Image

from flame_kd.cli import main
from flame_kd.engine import atomic_save
from flame_kd.models import build_student
from pipeline_helpers import migrated_store

SECRET = "S3cr3t-Pw-42"
TINY = "timm:test_resnet"
STUDENT = "timm:test_efficientnet"


@dataclass
class World:
    """What the probes break: a data set copy, a store with a few hand-made runs, files of each kind."""

    root: Path
    csv: Path
    uri: str
    runs: dict[str, str]  # what -> run id
    files: dict[str, Path]


def _fake_run(client: MlflowClient, exp: str, stage: str, config_text: str, best: Path | None,
              record: bool = True) -> str:
    """A run holding ``best`` as its best.pt, with the digest flame-kd records when it logs one
    (``record=False``: a file put in the artifact store by someone else)."""
    from flame_kd import integrity, tracking

    run = client.create_run(exp, tags={"flame_kd.stage": stage})
    client.log_text(run.info.run_id, config_text, "config.yaml")
    if best is not None:
        client.log_artifact(run.info.run_id, str(best), "checkpoints")
        if record:
            client.set_tag(run.info.run_id, tracking.digest_tag("checkpoints/best.pt"), integrity.sha256_file(best))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _files(root: Path) -> dict[str, Path]:
    """Every hostile file a probe names, made once."""
    f = {}
    f["empty"] = root / "empty.pt"
    f["empty"].write_bytes(b"")
    f["random"] = root / "random.pt"
    f["random"].write_bytes(os.urandom(3000))
    f["list"] = root / "list.pt"
    torch.save([1, 2, 3], f["list"])
    f["evil"] = root / "evil.pt"
    torch.save({"model": _Evil(root / "pwned"), "task": []}, f["evil"])
    student = build_student(STUDENT, image_size=32)
    f["student"] = root / "student" / "best.pt"
    f["student"].parent.mkdir()
    atomic_save({"model": student.state_dict(), "task": [], "epoch": 1, "score": 0.5}, f["student"])
    f["truncated"] = root / "truncated.pt"
    f["truncated"].write_bytes(f["student"].read_bytes()[: f["student"].stat().st_size // 2])
    data = bytearray(f["student"].read_bytes())
    f["flipped"] = root / "flipped.pt"  # bytes flipped inside a tensor: the zip still opens
    start = len(data) // 3
    for i in range(start, start + 200):
        data[i] ^= 0x5A
    f["flipped"].write_bytes(bytes(data))
    f["fifo"] = root / "pipe"
    os.mkfifo(f["fifo"])
    f["list_best"] = root / "list" / "best.pt"
    f["list_best"].parent.mkdir()
    torch.save(["not", "a", "checkpoint"], f["list_best"])
    f["spec_tag"] = root / "tag.yaml"
    f["spec_tag"].write_text("teachers: !!python/object/apply:os.system ['touch pwned']\n")
    f["spec_list"] = root / "list.yaml"
    f["spec_list"].write_text("- a\n- b\n")
    f["labels_bad"] = root / "labels.tsv"
    f["labels_bad"].write_text("1 zzz NN\nnot a range at all\n")
    f["a_file"] = root / "a-file"
    f["a_file"].write_text("not a folder")
    return f


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, synth_dir) -> World:
    root = tmp_path_factory.mktemp("probes")
    data = Path(shutil.copytree(synth_dir, root / "data"))
    uri = migrated_store(root / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("probes", artifact_location=str(root / "artifacts"))
    files = _files(root)
    tag_config = "data: !!python/object/apply:os.system ['touch pwned']\n"
    student_config = "data: {image_size: 32}\nstudent: lightweight-cnn\n"
    runs = {
        "tag": _fake_run(client, exp, "distill", tag_config, files["student"]),
        "list_best": _fake_run(client, exp, "distill", student_config, files["list_best"]),
        "other_arch": _fake_run(client, exp, "distill", student_config, files["student"]),
        "no_best": _fake_run(client, exp, "distill", student_config, None),
        "unrecorded_best": _fake_run(client, exp, "distill", student_config, files["student"], record=False),
        "swapped_best": _fake_run(client, exp, "distill", student_config, files["student"]),
        "not_flame": _fake_run(client, exp, "something", student_config, None),
    }
    swapped = client.get_run(runs["swapped_best"]).info.artifact_uri.removeprefix("file://")
    shutil.copyfile(files["list_best"], Path(swapped) / "checkpoints" / "best.pt")  # weights swapped in the store
    gone = client.create_experiment("deleted-one", artifact_location=str(root / "artifacts-deleted"))
    client.delete_experiment(gone)
    _break_data(data)
    return World(root, data / "flame2.csv", uri, runs, files)


def _break_data(data: Path) -> None:
    """Broken variants of the data set, each its own CSV over the same images."""
    import pandas as pd

    table = pd.read_csv(data / "flame2.csv")
    ir_dir = data / table["ir_frame"][0].rsplit("/", 1)[0]

    def variant(name: str, change) -> None:
        t = table.copy()
        change(t)
        t.to_csv(data / f"{name}.csv", index=False)

    def image(name: str, make) -> str:
        path = ir_dir / name
        make(path)
        return str(path.relative_to(data))

    variant("label2", lambda t: t.__setitem__("fire", t["fire"].astype(str).where(t.index != 3, "2")))
    variant("labelword", lambda t: t.__setitem__("smoke", t["smoke"].astype(str).where(t.index != 4, "maybe")))
    variant("dup_id", lambda t: t.__setitem__("id", t["id"].where(t.index != 5, t["id"][6])))
    variant("id_text", lambda t: t.__setitem__("id", t["id"].astype(str).where(t.index != 2, "seven")))
    variant("pair", lambda t: t.__setitem__("ir_frame", t["ir_frame"].where(t.index != 1, t["ir_frame"][9])))
    variant("blank", lambda t: t.__setitem__("rgb_frame", t["rgb_frame"].where(t.index != 1, "")))
    variant("missing_img", lambda t: t.__setitem__("rgb_frame", t["rgb_frame"].where(t.index != 1, "nope (2).jpg")))
    kinds = {
        "truncated": lambda p: p.write_bytes((data / table["ir_frame"][0]).read_bytes()[:200]),
        "garbage": lambda p: p.write_bytes(os.urandom(2000)),
        "fifo": lambda p: os.mkfifo(p),
        "folder": lambda p: p.mkdir(),
        "tiny": lambda p: Image.new("RGB", (1, 1)).save(p, format="JPEG"),
        "big": lambda p: Image.new("RGB", (64, 64)).save(p, format="JPEG"),
    }
    for kind, make in kinds.items():
        rel = image(f"254p Thermal Frame (2) {kind}.jpg", make)
        variant(f"img_{kind}", lambda t, rel=rel: t.__setitem__("ir_frame", t["ir_frame"].where(t.index != 1, rel)))
    (data / "empty.csv").write_bytes(b"")
    (data / "garbage.csv").write_bytes(os.urandom(500))
    (data / "header.csv").write_text("id,rgb_frame,ir_frame,fire,smoke\n")
    (data / "columns.csv").write_text("a,b\n1,2\n")
    (data / "utf16.csv").write_bytes((data / "flame2.csv").read_text().encode("utf-16"))
    os.mkfifo(data / "pipe.csv")
    (data / "folder.csv").mkdir()
    (data / "two.csv").write_text("\n".join((data / "flame2.csv").read_text().splitlines()[:3]) + "\n")


def T(*extra):  # a teacher command that would train, on the probe data
    return lambda w: ["teacher", "--teacher", TINY, "--data", str(w.csv), "--image-size", "32", "--epochs", "1",
                      "--no-pretrained", "--device", "cpu", "--experiment", "probes", *extra]


def D(*extra):  # a distill command
    return lambda w: ["distill", "--teacher", TINY, "--data", str(w.csv), "--image-size", "32", "--student", STUDENT,
                      "--no-pretrained", "--device", "cpu", "--experiment", "probes", *extra]


def E(*extra):  # embed from a checkpoint
    return lambda w: ["embed", "--model-type", "student", "--architecture", "lightweight-cnn", "--data", str(w.csv),
                      "--image-size", "32", "--device", "cpu", *extra]


def check(name):
    return lambda w: ["data", "check", str(w.csv.parent / name)]


def split(*extra):
    return lambda w: ["data", "split", str(w.csv), *extra]


def f(key):
    return lambda w: str(w.files[key])


def resolve(args, w):
    return [a(w) if callable(a) else a for a in (args(w) if callable(args) else args)]


# (id, command, exit code, what the one Error line says)
CASES = [
    # the frames CSV
    ("csv-missing", check("absent.csv"), 2, "no such file"),
    ("csv-folder", lambda w: ["data", "check", str(w.csv.parent / "folder.csv")], 2, "is a directory"),
    ("csv-fifo", check("pipe.csv"), 2, "is a FIFO (named pipe), not a regular file"),
    ("csv-device", lambda w: ["data", "check", "/dev/null"], 2, "is a character device"),
    ("csv-empty", check("empty.csv"), 2, "the file is empty"),
    ("csv-garbage", check("garbage.csv"), 2, "garbage.csv"),
    ("csv-header-only", check("header.csv"), 2, "no frames"),
    ("csv-columns", check("columns.csv"), 2, "missing column"),
    ("csv-utf16", check("utf16.csv"), 2, "utf16.csv"),
    ("label-2", check("label2.csv"), 2, "1 problem(s)"),
    ("label-word", check("labelword.csv"), 2, "1 problem(s)"),
    ("duplicate-id", check("dup_id.csv"), 2, "problem(s)"),
    ("id-not-number", check("id_text.csv"), 2, "problem(s)"),
    ("pair-mismatch", check("pair.csv"), 2, "problem(s)"),
    ("blank-path", check("blank.csv"), 2, "problem(s)"),
    ("image-missing", check("missing_img.csv"), 2, "problem(s)"),
    ("image-truncated", check("img_truncated.csv"), 2, "1 problem(s)"),
    ("image-garbage", check("img_garbage.csv"), 2, "1 problem(s)"),
    ("image-fifo", check("img_fifo.csv"), 2, "1 problem(s)"),
    ("image-folder", check("img_folder.csv"), 2, "problem(s)"),
    ("image-1x1", check("img_tiny.csv"), 2, "problem(s)"),
    ("image-size-pair", check("img_big.csv"), 2, "1 problem(s)"),
    ("root-is-a-file", lambda w: ["data", "check", str(w.csv), "--root", str(w.files["a_file"])], 2, "--root"),
    # splitting
    ("ratios-text", split("--ratios", "a,b,c"), 2, "ratios must be three numbers"),
    ("ratios-two", split("--ratios", "0.5,0.5"), 2, "ratios must be three"),
    ("ratios-no-train", split("--ratios", "0,0.5,0.5"), 2, "train > 0"),
    ("gap-negative", split("--gap", "-3"), 2, "--gap must be >= 0"),
    ("gap-word", split("--gap", "banana"), 2, "--gap must be auto, rule or a number"),
    ("labels-garbage", split("--labels", f("labels_bad")), 2, "labels.tsv"),
    ("labels-fifo", split("--labels", f("fifo")), 2, "FIFO"),
    ("split-two-frames", lambda w: ["data", "split", str(w.csv.parent / "two.csv"), "--gap", "rule"], 2, "too few"),
    ("synth-frames", lambda w: ["data", "synth", str(w.root / "s"), "--frames", "2"], 2, "--frames >= 3"),
    ("synth-size", lambda w: ["data", "synth", str(w.root / "s"), "--image-size", "4"], 2, "--image-size >= 8"),
    # run options, refused before any data is read or run started
    ("data-missing", lambda w: ["teacher", "--teacher", TINY, "--data", str(w.root / "absent.csv"), "--no-pretrained",
                                "--device", "cpu"], 2, "no such file"),
    ("lr-negative", T("--lr", "-1"), 2, "--lr (train.lr) must be > 0"),
    ("lr-nan", T("--lr", "nan"), 2, "must be a finite number, got nan"),
    ("epochs-zero", T("--epochs", "0"), 2, "--epochs (train.epochs) must be >= 1"),
    ("teacher-unknown", lambda w: T()(w)[:2] + ["nope-net"] + T()(w)[3:], 2, "nope-net"),
    ("device-cuda", T("--device", "cuda"), 2, "CUDA is not available"),
    ("device-tpu", T("--device", "tpu"), 2, "expected auto, cpu, cuda or mps"),
    ("alpha-inf", D("--alpha", "inf"), 2, "--alpha (loss.alpha) must be a finite number, got inf"),
    ("alpha-negative", D("--alpha", "-1"), 2, "--alpha (loss.alpha) must be >= 0"),
    ("temperature-zero", D("--temperature", "0"), 2, "temperature"),
    ("temperature-1e9", D("--temperature", "1e9"), 2, "--temperature (loss.temperature) must be <= 4096"),
    ("seed-negative", T("--seed", "-1"), 2, "--seed (train.seed) must be >= 0"),
    ("ratios-nan", T("--ratios", "nan,0.5,0.5"), 2, "--ratios (data.ratios) must be three finite numbers"),
    ("ratios-empty-val", T("--ratios", "1,0,0"), 2, "leaves the val split empty"),
    ("register-as-bad", T("--register-as", "a/b%c"), 2, "--register-as (tracking.register_as) must be"),
    ("loss-unknown", D("--loss", "nope"), 2, "nope"),
    ("teacher-run-absent", D("--teacher-run-id", "0123456789abcdef0123456789abcdef"), 2, "not found"),
    ("teacher-run-not-teacher", lambda w: D("--teacher-run-id", w.runs["not_flame"])(w), 2,
     "is not a flame-kd teacher run"),
    # tracking stores: no secret printed, whatever the mistake
    ("uri-words", T("--tracking-uri", "not a uri at all"), 2, "--tracking-uri not a uri at all"),
    ("uri-ftp", T("--tracking-uri", f"ftp://u:{SECRET}@host/x"), 2, "ftp://***@host/x"),
    ("uri-port-range", T("--tracking-uri", f"http://u:{SECRET}@127.0.0.1:99999"), 2, "not a usable URL"),
    ("uri-refused", T("--tracking-uri", f"http://u:{SECRET}@127.0.0.1:9"), 2, "unreachable"),
    ("uri-no-colon", T("--tracking-uri", f"postgresql+psycopg2//u:{SECRET}@db/x"), 2, "***@db/x"),
    ("uri-bad-ipv6", T("--tracking-uri", f"http://u:{SECRET}@[::1"), 2, "not a usable URL"),
    ("storage-no-colon", lambda w: ["sweep", "--teacher", TINY, "--data", str(w.csv), "--image-size", "32",
                                    "--no-pretrained", "--device", "cpu", "--loss", "kl_bce", "--storage",
                                    f"postgresql+psycopg2//user:{SECRET}@db/optuna"], 2, "cannot open Optuna storage"),
    ("experiment-deleted", T("--experiment", "deleted-one"), 2, "was deleted"),
    ("experiment-too-long", T("--experiment", "e" * 1000), 2, "MLflow cannot create it"),
    ("cache-dir-a-file", lambda w: T("--cache", "disk", "--cache-dir", str(w.files["a_file"]))(w), 2,
     "cannot hold the frame cache"),
    # embed: options and checkpoints
    ("embed-max-samples", E("--checkpoint", f("student"), "--max-samples", "0"), 2, "--max-samples"),
    ("embed-perplexity", E("--checkpoint", f("student"), "--method", "tsne", "--perplexity", "0"), 2, "--perplexity"),
    ("embed-neighbors", E("--checkpoint", f("student"), "--n-neighbors", "1"), 2, "--n-neighbors"),
    ("ckpt-empty", E("--checkpoint", f("empty")), 2, "not a readable torch file"),
    ("ckpt-random", E("--checkpoint", f("random")), 2, "not a readable torch file"),
    ("ckpt-list", E("--checkpoint", f("list")), 2, "it holds a list"),
    ("ckpt-evil", E("--checkpoint", f("evil")), 2, "refused to load"),
    ("ckpt-other-arch", E("--checkpoint", f("student")), 2, "do not fit"),
    ("ckpt-truncated", E("--checkpoint", f("truncated")), 2, "not a readable torch file"),
    ("ckpt-flipped", E("--checkpoint", f("flipped")), 2, "corrupted"),
    ("ckpt-fifo", E("--checkpoint", f("fifo")), 2, "FIFO"),
    ("run-config-python-tag", lambda w: ["embed", "--run-id", w.runs["tag"]], 2, "not plain YAML"),
    ("run-best-a-list", lambda w: ["embed", "--run-id", w.runs["list_best"]], 2, "it holds a list"),
    ("run-best-other-arch", lambda w: ["embed", "--run-id", w.runs["other_arch"]], 2, "do not fit"),
    ("run-without-best", lambda w: ["embed", "--run-id", w.runs["no_best"]], 1, "best.pt"),
    ("run-best-unrecorded", lambda w: ["embed", "--run-id", w.runs["unrecorded_best"]], 2,
     "refused to use checkpoints/best.pt of run"),
    ("run-best-swapped", lambda w: ["embed", "--run-id", w.runs["swapped_best"]], 2,
     "changed after flame-kd logged it"),
    ("run-absent", lambda w: ["embed", "--run-id", "0123456789abcdef0123456789abcdef"], 2, "not found"),
    # studies and reports
    ("spec-missing", lambda w: ["ablation", "--spec", str(w.root / "absent.yaml")], 2, "not found"),
    ("spec-fifo", lambda w: ["ablation", "--spec", str(w.files["fifo"])], 2, "FIFO"),
    ("spec-python-tag", lambda w: ["ablation", "--spec", str(w.files["spec_tag"])], 2, "not valid YAML"),
    ("spec-a-list", lambda w: ["ablation", "--spec", str(w.files["spec_list"])], 2, "not a mapping"),
    ("compare-absent", lambda w: ["compare", "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"],
     2, "not found"),
    ("ui-url-no-store", lambda w: ["ui-url", "--tracking-uri", f"sqlite:///{w.root / 'none.db'}",
                                   "--host", f"http://u:{SECRET}@h:5000"], 2, "no MLflow store at sqlite:///"),
    ("report-no-experiment", lambda w: ["report", "--experiment", "nope", "--out", str(w.root / "r")], 2, "nope"),
]


def _store_state(uri: str) -> list:
    client = MlflowClient(uri)
    exps = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL, max_results=1000)
    return sorted([(e.experiment_id, e.name, e.lifecycle_stage) for e in exps]) + sorted(
        [(r.info.run_id, r.info.status, sorted(r.data.tags.items()), sorted(r.data.metrics)) for r in runs])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_input_is_one_named_line(case, world, monkeypatch, tmp_path, capfd):
    _, command, code, needle = case
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world.uri)
    monkeypatch.setenv("FLAME_KD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(world.uri)
    before = _store_state(world.uri)
    result = CliRunner().invoke(main, resolve(command, world))
    printed = result.output + "".join(capfd.readouterr())
    assert result.exit_code == code, printed[-3000:]
    assert "Traceback" not in printed and SECRET not in printed, printed[-3000:]
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output[-3000:]
    assert needle in result.output, result.output[-3000:]
    assert _store_state(world.uri) == before
    assert not (world.root / "pwned").exists() and not Path("pwned").exists()


def test_there_are_at_least_sixty_probes():
    assert len(CASES) >= 63


@pytest.mark.parametrize("error, code, shown", [
    (EOFError("Ran out of input"), 1, "Error: EOFError: Ran out of input"),  # was "stopped by SIGINT"
    (mlflow.exceptions.MlflowException(f"API request to http://u:{SECRET}@h:5000/api failed\nmore"), 1,
     "Error: MlflowException: API request to http://***@h:5000/api failed"),
    (OSError(28, "No space left on device"), 1, "Error: OSError: [Errno 28] No space left on device"),
])
def test_the_last_resort_is_one_redacted_line(monkeypatch, error, code, shown):
    from flame_kd.data import schema

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(schema, "check_frames", fail)
    result = CliRunner().invoke(main, ["data", "check", "x.csv"])
    assert result.exit_code == code and result.output.strip() == shown, result.output


def test_a_bug_still_shows_its_traceback_without_the_secret(monkeypatch):
    from flame_kd.data import schema

    def fail(*args, **kwargs):
        raise RuntimeError(f"cannot reach postgresql+psycopg2//user:{SECRET}@db/x")

    monkeypatch.setattr(schema, "check_frames", fail)
    result = CliRunner().invoke(main, ["data", "check", "x.csv"])
    assert result.exit_code == 1 and "Traceback" in result.output  # a bug to report, with where it happened
    assert SECRET not in result.output and "postgresql+psycopg2//***@db/x" in result.output
