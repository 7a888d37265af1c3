"""logging.report_to: W&B and MLflow runs read back offline, resume into the same tracker run
with no step twice, the install check, a failing tracker, sweep grouping.

MLflow runs against a local file store (``MLFLOW_TRACKING_URI=file://...``) and is read back
through ``MlflowClient``; W&B runs in offline mode and its ``.wandb`` file is read back record
by record as ``wandb.proto`` ``Record`` messages. No test needs a network.
"""

from __future__ import annotations

import glob
import math
import struct

import pytest
from helpers import TINY, cli, tiny_recipe

from apactl import trackers
from apactl.hooks import Hooks
from apactl.metrics import read_metrics


def interrupted_then_resumed(run, recipe, at: int) -> None:
    """``run(recipe)`` stopped right after step ``at`` is logged, then resumed to the end."""
    def stop(step, _):
        if step == at:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        run(recipe, hooks=Hooks(on_step_end=stop))
    run(recipe, resume=True)


def expected_points(out) -> dict[tuple[str, int], float]:
    """(metric, step) -> value of every number in metrics.jsonl."""
    return {(k, r["step"]): v for r in read_metrics(out) for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


CLOCKS = ("perf/", "time/")  # wall-clock figures: a step recomputed on resume differs


def same(a: dict, b: dict) -> bool:
    """The same (metric, step) points, with the same values except wall-clock ones (the
    tracker keeps the first attempt's figures of a step that the resume recomputed)."""
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9) for k in a
        if not k[0].startswith(CLOCKS))


# ------------------------------------------------------------------------------- MLflow
def test_mlflow_reads_back_every_metric_and_the_recipe_after_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from apactl.workflows.sft import run_sft

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
    out = tmp_path / "run"
    recipe = tiny_recipe("sft", out, "logging.report_to=[mlflow]", "logging.project=exp",
                         "train.save_every=2", "train.eval_every=2")
    # Stopped after step 3 was sent; the resume restarts from the step-2 checkpoint and
    # recomputes step 3, which the tracker must not get twice.
    interrupted_then_resumed(run_sft, recipe, at=3)

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1  # the resume continued the same MLflow run
    run = runs[0]
    assert run.info.run_name == "tiny-sft" and run.info.status == "FINISHED"
    expected = expected_points(out)
    got, dup = {}, []
    for key in {k for k, _ in expected}:
        history = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in history]
        dup += [(key, s) for s in set(steps) if steps.count(s) > 1]
        got.update({(key, m.step): m.value for m in history})
    assert not dup, dup
    assert same(got, expected)
    assert {s for _, s in expected} == set(range(0, 7))  # eval at 0, train 1..6
    flat = trackers.flatten(recipe.model_dump(mode="json"))
    assert run.data.params == {k: trackers.param_text(v) for k, v in flat.items()}
    assert run.data.params["train.lr"] == "0.003" and run.data.tags["apactl.kind"] == "sft"


def test_mlflow_after_a_real_sigkill_and_resume_one_run_no_step_twice(tmp_path, monkeypatch):
    """A subprocess SIGKILLs itself while scoring iteration 4 (steps 1-3 sent, checkpoint at
    2); ``--resume`` recomputes 3 and runs 4: one MLflow run, every step once."""
    pytest.importorskip("mlflow")
    import os
    import subprocess
    import sys

    from helpers import ROOT
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out, marker = tmp_path / "run", tmp_path / "killed"
    args = ["align", str(TINY / "align.yaml"), f"run.output_dir={out}",
            "logging.report_to=[mlflow]", "logging.progress=false", "run.num_threads=1",
            "reward.name=helpers:kill_once", f"reward.args.marker={marker}", "reward.args.at=4",
            "critic.init=policy", "train.iterations=4", "train.save_every=2",
            "train.rollout_batch_size=8", "train.minibatch_size=4", "data.max_rows=16"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "apactl", *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9 and marker.exists(), killed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    res = cli(*args, "--resume")
    assert res.exit_code == 0, res.output

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("apactl").experiment_id])
    assert run.info.status == "FINISHED"
    expected = expected_points(out)
    got = {}
    for key in {k for k, _ in expected}:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3, 4], (key, steps)  # each step once
        got.update({(key, m.step): m.value
                    for m in client.get_metric_history(run.info.run_id, key)})
    assert same(got, expected)


# -------------------------------------------------------------------------------- W&B
def wandb_records(path: str):
    """The records of a ``.wandb`` file as ``wandb.proto`` ``Record`` messages.

    The file is wandb's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
    then LevelDB-log blocks of 32 KiB, each record cut into chunks with a 7-byte header (crc32,
    length, type: 1 full, 2 first, 3 middle, 4 last). wandb >= 0.22 dropped its Python reader
    (``wandb.sdk.internal.datastore``), so the framing is read here and every record is
    decoded by wandb's own protobuf classes.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_has_every_metric_and_the_config_after_a_resume(tmp_path,
                                                                         monkeypatch):
    pytest.importorskip("wandb")
    import json

    from apactl.workflows.align import run_align

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    recipe = tiny_recipe("align", out, "logging.report_to=[wandb]", "logging.group=g1",
                         "train.iterations=4", "train.save_every=2", "train.rollout_batch_size=8",
                         "train.minibatch_size=4", "data.max_rows=16")
    interrupted_then_resumed(run_align, recipe, at=3)

    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2  # the first attempt and the resume
    got, dup, configs, runs = {}, [], [], []
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                runs.append((r.run.run_id, r.run.display_name, r.run.project, r.run.run_group,
                             list(r.run.tags)))
                configs.append({i.key: json.loads(i.value_json) for i in r.run.config.update
                                if not i.key.startswith("_")})
            elif kind == "history":
                step = r.history.step.num
                for item in r.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if key.startswith("_"):
                        continue  # wandb's own _step, _runtime, _timestamp
                    dup += [(key, step)] if (key, step) in got else []
                    got[(key, step)] = json.loads(item.value_json)
    assert len({r[0] for r in runs}) == 1  # one W&B run id: the resume continued it
    assert runs[0][1:] == ("tiny-align", "apactl", "g1", ["apactl", "align", "apa"])
    assert not dup, dup
    expected = expected_points(out)
    assert same(got, expected) and {s for _, s in expected} == {1, 2, 3, 4}
    flat = json.loads(json.dumps(trackers.flatten(recipe.model_dump(mode="json"))))
    assert all(c == flat for c in configs)


# ------------------------------------------------------------------ install and failures
def test_a_tracker_that_is_not_installed_is_a_recipe_error_before_any_model_loads(
        tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda name: name != "wandb")
    out = tmp_path / "run"
    res = cli("sft", TINY / "sft.yaml", f"run.output_dir={out}",
              "logging.report_to=[tensorboard,wandb]")
    assert res.exit_code == 2, res.output
    assert res.output.strip() == ("error: logging.report_to: wandb is not installed; install "
                                  "it with `pip install 'apactl[wandb]'`")
    assert not out.exists()
    res = cli("recipe", "validate", TINY / "sft.yaml", "logging.report_to=[mlflow, wandb]")
    assert res.exit_code == 0 and "warning: logging.report_to: wandb is not installed" \
        in res.output


class Flaky:
    """A tracker whose server goes away at step 3."""

    name, resumable, logged = "wandb", True, []

    def __init__(self, run, state, resume_step):
        self.id = "flaky"

    def log(self, step, metrics):
        if step >= 3:
            raise ConnectionError("server gone")
        Flaky.logged.append(step)

    def close(self, failed):
        pass


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "installed", lambda name: True)
    monkeypatch.setitem(trackers.BACKENDS, "wandb", Flaky)
    Flaky.logged = []
    out = tmp_path / "run"
    res = cli("sft", TINY / "sft.yaml", f"run.output_dir={out}", "logging.progress=false",
              "logging.report_to=[wandb]")
    assert res.exit_code == 0, res.output
    assert res.output.count("wandb failed (server gone); the run goes on") == 1
    assert Flaky.logged == [1, 2] and (out / "final" / "config.json").is_file()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6, 6]


def test_only_the_main_process_talks_to_trackers(tmp_path, monkeypatch):
    from apactl.config import LoggingConfig
    from apactl.metrics import MetricsLogger

    monkeypatch.setitem(trackers.BACKENDS, "wandb", Flaky)
    Flaky.logged = []
    other = MetricsLogger(tmp_path / "r1", LoggingConfig(report_to=["wandb"]), enabled=False)
    other.log(1, {"a/b": 1.0})
    other.close()
    assert other.trackers is None and Flaky.logged == [] and not (tmp_path / "r1").exists()
    main = MetricsLogger(tmp_path / "r0", LoggingConfig(report_to=["wandb"]), enabled=True)
    main.log(1, {"a/b": 1.0})
    main.close()
    assert Flaky.logged == [1]


def test_config_report_to_and_the_older_tensorboard_switch():
    from apactl.config import LoggingConfig

    assert LoggingConfig().report_to == ["tensorboard"]
    assert LoggingConfig(tensorboard=False).trackers == []
    assert LoggingConfig(report_to=["mlflow"], tensorboard=True).trackers == ["mlflow",
                                                                             "tensorboard"]
    assert LoggingConfig(report_to="wandb").report_to == ["wandb"]
    with pytest.raises(ValueError, match="none"):
        LoggingConfig(report_to=["none", "wandb"])


def test_flatten_gives_dotted_keys_and_indexes_lists_of_mappings():
    flat = trackers.flatten({"train": {"lr": 1e-3, "x": {"y": 1}}, "judges": [{"name": "a"}],
                             "report_to": ["wandb"], "empty": {}})
    assert flat == {"train.lr": 1e-3, "train.x.y": 1, "judges.0.name": "a",
                    "report_to": ["wandb"], "empty": {}}
    assert trackers.param_text(None) == "null" and trackers.param_text("a") == "a"


def test_sweep_groups_its_tracked_runs(tmp_path, monkeypatch):
    from apactl.workflows.sweep_plan import plan_sweep

    monkeypatch.setattr(trackers, "installed", lambda name: True)
    root = tmp_path / "study"
    plan = plan_sweep(str(TINY / "align.yaml"), ["algo.name=apa,ppo"],
                      [f"run.output_dir={root}", "logging.report_to=[mlflow]"])
    for run in plan.runs:
        assert run.overrides[:2] == ["logging.group=study", f"run.name={run.name}"]
    plain = plan_sweep(str(TINY / "align.yaml"), ["algo.name=apa"], [f"run.output_dir={root}"])
    assert not any(o.startswith("logging.group") for o in plain.runs[0].overrides)


def test_eval_sends_its_figures_table_and_files_to_mlflow(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "eval"
    res = cli("eval", TINY / "eval.yaml", f"run.output_dir={out}", "--judge", "length",
              "eval.bootstrap=50", "data.max_rows=16", "data.eval_rows=4",
              "generation.max_new_tokens=8", "logging.progress=false", "run.num_threads=1",
              "logging.report_to=[mlflow]")
    assert res.exit_code == 0, res.output
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("apactl").experiment_id])
    assert run.info.run_name == "tiny-eval" and run.data.tags["apactl.kind"] == "eval"
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.json", "samples.jsonl", "frontier.png",
            "eval_summary.json"} <= files
    import json

    report = json.loads((out / "report.json").read_text())
    assert run.data.metrics["tiny/length_mean"] == report["policies"][1]["judges"]["length"]["mean"]
    table = json.loads(open(client.download_artifacts(run.info.run_id, "eval_summary.json",
                                                      str(tmp_path))).read())
    assert [r[0] for r in table["data"]] == ["init (baseline)", "tiny"]
