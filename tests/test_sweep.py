"""apactl sweep: grid parsing and naming (pure), validation before any run, dry run, failure and
Ctrl-C handling (a fake program in place of apactl: milliseconds), then real tiny-model runs:
emitted scripts executed locally, a killed run resumed by the sweep, finished runs skipped.
Plus the seed-level Student-t interval of eval_stats.

Each real run is a subprocess (about 10 s of CPU, mostly importing torch and transformers), so
one test tells the whole story with four of them.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
from helpers import ROOT
from typer.testing import CliRunner

import apactl.workflows.sweep as sw
import apactl.workflows.sweep_plan as sp
from apactl.cli import app
from apactl.errors import RecipeError
from apactl.eval_stats import seed_interval, t_critical
from apactl.metrics import read_metrics

TINY = str(ROOT / "recipes/tiny/align.yaml")
SMALL = ["train.rollout_batch_size=4", "train.minibatch_size=4", "train.epochs_per_rollout=1",
         "data.max_rows=8", "generation.max_new_tokens=4", "logging.tensorboard=false",
         "logging.progress=false"]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["sweep", *args])


def errors(res) -> list[str]:
    return [ln for ln in res.output.splitlines() if ln.strip()]


@pytest.fixture
def subprocess_env(monkeypatch, tmp_path):
    """Children import this checkout's apactl; emitted scripts find `apactl` on PATH."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------- pure parts
def test_grid_expansion_order_values_and_names():
    axes = sp.parse_grid(["algo.name=apa,ppo", "run.seed=0,1,2"], [])
    points = sp.expand(axes)
    names = [sp.run_name([(k, t) for k, t, _ in p]) for p in points]
    assert names == [f"algo.name={a},run.seed={s}" for a in ("apa", "ppo") for s in (0, 1, 2)]
    assert points[4] == [("algo.name", "ppo", "ppo"), ("run.seed", "1", 1)]
    # Values parse like OmegaConf dotlist values; brackets and quotes keep their commas.
    axis = sp.parse_axis("k=1e-4,true,null,[a,b],'x,y',{a: 1}")
    assert axis.values == (1e-4, True, None, ["a", "b"], "x,y", {"a": 1})
    assert axis.texts[3:5] == ("[a,b]", "'x,y'")


def test_names_are_single_safe_folders_and_unambiguous():
    name = sp.run_name([("data.source", "a b/c,d=e%.jsonl"), ("run.seed", "1")])
    assert name == "data.source=a%20b%2Fc%2Cd%3De%25.jsonl,run.seed=1"
    assert "/" not in name and " " not in name
    pairs = [p.split("=") for p in name.split(",")]  # ',' and '=' only ever separate
    assert [(k, unquote(v)) for k, v in pairs] == [("data.source", "a b/c,d=e%.jsonl"),
                                                   ("run.seed", "1")]
    long1, long2 = (sp.run_name([("k", "x" * 300 + end)]) for end in "ab")
    assert len(long1) <= sp.MAX_NAME and long1 != long2 and long1[:180] == long2[:180]


def test_commands_and_run_finished(tmp_path):
    cmd = sp.build_command(["apactl"], "align", "r.yaml", ["a=1", "b=x y"], tmp_path / "f")
    assert cmd == ["apactl", "align", "r.yaml", "a=1", "b=x y", f"run.output_dir={tmp_path}/f",
                   "--resume"]
    assert not sp.run_finished(tmp_path)
    (tmp_path / "final").mkdir()
    assert sp.run_finished(tmp_path)
    assert sw.last_line(b"a\n\x1b[1mstep 3\x1b[0m\r\x1b[2Kerror: boom\n\n") == "error: boom"


def test_state_is_written_atomically_and_read_back(tmp_path):
    path = tmp_path / "sweep.json"
    sw.write_state(path, {"runs": [{"name": "a"}]})
    assert sw.read_state(path)["runs"] == [{"name": "a"}] and "updated" in sw.read_state(path)
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]  # no temp file left
    path.write_text("{half")
    assert sw.read_state(path) is None


def test_seed_interval_student_t():
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert t_critical(0.95, df) == pytest.approx(t, abs=1e-3), df
    assert t_critical(0.99, 1) == pytest.approx(63.657, abs=1e-3)
    mean, lo, hi = seed_interval([1.0, 2.0, 3.0])  # s = 1, n = 3
    assert mean == 2.0
    assert (lo, hi) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)),
                                     abs=1e-3)
    mean, lo, hi = seed_interval([0.5])
    assert mean == 0.5 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        seed_interval([])


# ---------------------------------------------------------------------- CLI: bad input, dry run
def test_help_has_example_and_imports_no_torch():
    code = ("import sys; from typer.testing import CliRunner; from apactl.cli import app; "
            "r = CliRunner().invoke(app, ['sweep', '--help']); assert r.exit_code == 0; "
            "assert 'Example:' in r.output and '--grid' in r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("grid, expected", [
    (["algo.name"], "error: --grid 'algo.name': expected KEY=V1,V2,..."),
    (["algo.name="], "error: --grid algo.name: no values"),
    (["algo.name=apa,,ppo"], "error: --grid algo.name: empty value in 'apa,,ppo'"),
    (["run.seed=0,1", "run.seed=2"], "error: --grid run.seed: given twice"),
    (["run.seed=1,01"], "error: --grid run.seed: value 1 is listed twice"),
    (["policy.lora=[a,b"], "error: --grid policy.lora: unbalanced brackets or quotes"),
    (["run.output_dir=a,b"], "error: --grid run.output_dir: the sweep names each run's folder"),
    (["train.lr=1e-3,2e-3", "algo.name=apa"], "error: --grid train.lr: also set by the override"),
    (["kind=align,sft"], "error: --grid kind: a sweep runs one kind of recipe"),
    ([], "error: --grid: give at least one"),
])
def test_grid_syntax_errors_exit_2(tmp_path, grid, expected):
    res = invoke(TINY, *(a for g in grid for a in ("--grid", g)), "train.lr=1e-3",
                 f"run.output_dir={tmp_path / 'root'}")
    assert res.exit_code == 2, res.output
    assert len(errors(res)) == 1 and errors(res)[0].startswith(expected), res.output
    assert not (tmp_path / "root").exists()


def test_bad_grid_value_fails_before_any_run(tmp_path):
    t0 = time.monotonic()
    res = invoke(TINY, "--grid", "algo.name=apa,apo", "--grid", "run.seed=0,1",
                 "--grid", "train.lr=1e-3,-1", f"run.output_dir={tmp_path / 'root'}")
    assert res.exit_code == 2, res.output
    lines = errors(res)
    # One line per problem, naming the run and the field: 4 of the 8 points have apo, 4 have
    # train.lr=-1 (2 have both: one line for each problem).
    assert "error: run algo.name=apo,run.seed=0,train.lr=1e-3: algo.name: unknown algorithm; " \
           "expected one of: apa, ppo, awr, grpo, rloo" in lines
    assert "error: run algo.name=apa,run.seed=1,train.lr=-1: train.lr: Input should be " \
           "greater than 0, got -1" in lines
    assert len(lines) == 4 + 4 and "Traceback" not in res.output
    assert not (tmp_path / "root").exists()
    assert time.monotonic() - t0 < 10


def test_other_user_errors_exit_2(tmp_path):
    res = invoke(str(ROOT / "recipes/tiny/eval.yaml"), "--grid", "run.seed=0,1")
    assert res.exit_code == 2 and errors(res) == [
        "error: kind: apactl sweep runs align, sft, rm, dpo recipes, not 'eval'"], res.output
    res = invoke(TINY, "--grid", "run.seed=0,1", "--emit", "pbs")
    assert res.exit_code == 2 and errors(res)[0].startswith("error: --emit: expected one of")
    res = invoke(str(tmp_path / "nope.yaml"), "--grid", "run.seed=0,1")
    assert res.exit_code == 2 and errors(res) == [f"error: recipe: file not found: "
                                                  f"{tmp_path / 'nope.yaml'}"]
    res = invoke(TINY, "--grid", "data.source=missing.jsonl")
    assert res.exit_code == 2 and errors(res) == [
        "error: run data.source=missing.jsonl: data.source: file not found: missing.jsonl"]


def test_dry_run_prints_runs_and_commands_and_runs_nothing(tmp_path):
    root = tmp_path / "root"
    res = invoke(TINY, "--grid", "algo.name=apa,awr", "--grid", "run.name=a b/c",
                 "train.iterations=2", f"run.output_dir={root}", "--dry-run")
    assert res.exit_code == 0, res.output
    assert f"2 align runs of {TINY} in {root}:" in res.output
    folder = root / "algo.name=awr,run.name=a%20b%2Fc"
    assert f"[1] algo.name=awr,run.name=a%20b%2Fc\n    folder:  {folder}\n" in res.output
    cmd = shlex.split(res.output.splitlines()[-1].removeprefix("    command: "))
    assert cmd == [sys.executable, "-m", "apactl", "align", TINY, "train.iterations=2",
                   "algo.name=awr", "run.name=a b/c", f"run.output_dir={folder}", "--resume"]
    assert not root.exists()


# ------------------------------------------------ failures and Ctrl-C, with a fake program
FAKE = """
import json, os, pathlib, signal, sys, time
arg = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
out = pathlib.Path(arg["run.output_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/score_mean": 0.5}) + "\\n")
if arg.get("run.seed") == "7":  # Ctrl-C reaches the sweep; this run still ends, in the grace
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(0.3)
    (out / "final").mkdir()
elif arg.get("run.seed") == "9":  # runs on, until something ends it
    (out / "pid").write_text(str(os.getpid()))
    time.sleep(60)
elif arg["algo.name"] == "apa":
    (out / "final").mkdir()
elif arg["algo.name"] == "awr":
    print("some progress\\nerror: boom", file=sys.stderr)
    sys.exit(3)
else:  # ppo: Ctrl-C reaches the sweep alone (kill -INT), while this run is going
    os.kill(os.getppid(), signal.SIGINT)
    time.sleep(30)
"""


@pytest.fixture
def fake_apactl(tmp_path, monkeypatch):
    script = tmp_path / "fake_apactl.py"
    script.write_text(FAKE)
    monkeypatch.setattr(sp, "local_program", lambda: [sys.executable, str(script)])
    monkeypatch.setattr(sw, "STOP_GRACE_S", (0.2, 10.0))
    return tmp_path / "root"


def test_failed_run_does_not_stop_the_sweep(fake_apactl):
    root = fake_apactl
    res = invoke(TINY, "--grid", "algo.name=awr,apa", f"run.output_dir={root}")
    assert res.exit_code == 1, res.output
    assert "error: boom" in res.output  # the child's stderr is shown as it runs
    assert "failed (3)" in res.output and "finished" in res.output  # the table
    state = json.loads((root / "sweep.json").read_text())
    awr, apa = state["runs"]
    assert (awr["status"], awr["exit_code"], awr["error"]) == ("failed", 3, "error: boom")
    assert (apa["status"], apa["exit_code"], apa["error"]) == ("finished", 0, None)
    assert apa["metrics"] == {"step": 1, "reward/score_mean": 0.5} == awr["metrics"]
    assert apa["folder"] == str(root / "algo.name=apa") and apa["seconds"] >= 0
    assert apa["overrides"] == ["algo.name=apa"] and apa["grid"] == {"algo.name": "apa"}
    assert state["grid"] == {"algo.name": ["awr", "apa"]} and state["kind"] == "align"
    assert "error: boom" in (root / "algo.name=awr" / sw.LOG_FILE).read_text()


def test_a_second_grid_into_the_same_root_keeps_the_first_ones_record(fake_apactl):
    root = fake_apactl
    assert invoke(TINY, "--grid", "algo.name=apa", f"run.output_dir={root}").exit_code == 0
    res = invoke(TINY, "--grid", "algo.name=apa", "--grid", "run.seed=1",
                 f"run.output_dir={root}")
    assert res.exit_code == 0, res.output
    state = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in state["runs"]] == ["algo.name=apa,run.seed=1"]
    [first] = state["earlier_runs"]
    assert (first["name"], first["status"]) == ("algo.name=apa", "finished")
    # Back to the first grid: its run is current again, the second one becomes earlier.
    assert invoke(TINY, "--grid", "algo.name=apa", f"run.output_dir={root}").exit_code == 0
    state = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in state["runs"]] == ["algo.name=apa"]
    assert [r["name"] for r in state["earlier_runs"]] == ["algo.name=apa,run.seed=1"]


def test_ctrl_c_marks_the_running_run_interrupted(fake_apactl):
    # Python's Ctrl-C handler, also when pytest itself runs in the background (`cmd &` in a
    # script starts it with SIGINT ignored, and Python then installs no handler).
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        root = fake_apactl
        t0 = time.monotonic()
        res = invoke(TINY, "--grid", "algo.name=ppo,apa", f"run.output_dir={root}")
    finally:
        signal.signal(signal.SIGINT, old)
    assert res.exit_code == 130 and "error: interrupted" in res.output, res.output
    assert time.monotonic() - t0 < 15  # the child was stopped, not waited for (30 s)
    ppo, apa = json.loads((root / "sweep.json").read_text())["runs"]
    assert ppo["status"] == "interrupted" and ppo["pid"] is None
    assert apa["status"] == "pending" and not (root / "algo.name=apa").exists()


# ------------------------------------------------------------------- real tiny-model runs
def mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.glob("*/metrics.jsonl")}


def kill_when_exists(cmd: list[str], path: Path, **env: str) -> None:
    """Start ``cmd`` and SIGKILL its whole process group as soon as ``path`` exists."""
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not path.exists() and proc.poll() is None:
        time.sleep(0.02)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended by itself: the assertion below says why not
        pass
    proc.wait()
    assert path.exists(), f"{path} never appeared"


def test_real_sweep_emitted_scripts_kill_resume_and_skip(subprocess_env, tmp_path):
    """One story on the tiny model, four subprocesses (each ~10 s of importing torch): a SLURM
    task is killed mid-run, the local sweep resumes it and runs the other point, a second
    sweep runs nothing, and an emitted command re-run on a finished run changes nothing."""
    root, n = tmp_path / "root", 6
    args = [TINY, "--grid", "algo.name=apa,awr", *SMALL, f"train.iterations={n}",
            "train.save_every=1", f"run.output_dir={root}"]
    apa, awr = root / "algo.name=apa", root / "algo.name=awr"
    for emit, name in (("commands", "commands.txt"), ("slurm", "sweep.sbatch")):
        res = invoke(*args, "--emit", emit)
        assert res.exit_code == 0 and res.output.strip() == str(root / name), res.output
    lines = (root / "commands.txt").read_text().splitlines()
    assert len(lines) == 2 and all(" apactl align " in ln and ln.endswith(" --resume")
                                   for ln in lines)
    assert "#SBATCH --array=0-1\n" in (root / "sweep.sbatch").read_text()
    assert sorted(p.name for p in root.iterdir()) == ["commands.txt", "sweep.sbatch"]

    # Array task 0 as SLURM would start it (#SBATCH lines are comments to bash), killed once
    # it has saved a checkpoint.
    kill_when_exists(["bash", str(root / "sweep.sbatch")], apa / "checkpoints/step-00000002",
                     SLURM_ARRAY_TASK_ID="0")
    assert not sp.run_finished(apa)

    res = invoke(*args)  # resumes apa, runs awr from scratch
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "starting from scratch" in res.output
    assert "reward" in res.output and "kl" in res.output  # the table's metric columns
    state = json.loads((root / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in state["runs"]] == [
        ("algo.name=apa", "finished"), ("algo.name=awr", "finished")]
    for r in state["runs"]:
        assert r["metrics"]["step"] == n and "kl/ref_k1" in r["metrics"] and r["seconds"] > 0
        # Every iteration logged exactly once, the killed run's included.
        assert [m["step"] for m in read_metrics(r["folder"])] == list(range(1, n + 1))
        assert r["overrides"][-1] == r["name"] and r["exit_code"] == 0

    before = mtimes(root)
    res = invoke(*args)  # everything finished: nothing runs
    assert res.exit_code == 0 and res.output.count("finished earlier, skipped") == 2
    assert mtimes(root) == before

    # An emitted command on a finished run (a re-queued task) resumes at the end: harmless.
    done = subprocess.run(["bash", "-c", lines[1]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"(step {n})" in done.stderr and sp.run_finished(awr)
    assert [m["step"] for m in read_metrics(awr)] == list(range(1, n + 1))


def test_plan_rejects_problems_with_recipe_error():
    with pytest.raises(RecipeError) as exc:
        sp.plan_sweep(TINY, ["algo.name=apa,apo"], [])
    assert exc.value.problems == ["run algo.name=apo: algo.name: unknown algorithm; expected one "
                                  "of: apa, ppo, awr, grpo, rloo"]


# ------------------------------------------------------------- issue 20: stop and kill
def test_a_run_that_ends_within_the_grace_period_is_recorded_finished(fake_apactl,
                                                                       monkeypatch):
    monkeypatch.setattr(sw, "STOP_GRACE_S", (5.0, 10.0))
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        res = invoke(TINY, "--grid", "run.seed=7,8", "algo.name=apa",
                     f"run.output_dir={fake_apactl}")
    finally:
        signal.signal(signal.SIGINT, old)
    assert res.exit_code == 130, res.output
    seven, eight = json.loads((fake_apactl / "sweep.json").read_text())["runs"]
    assert (seven["status"], seven["exit_code"], seven["error"]) == ("finished", 0, None)
    assert eight["status"] == "pending"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_a_sigkilled_sweep_leaves_no_run_behind(fake_apactl):
    root, fake = fake_apactl, fake_apactl.parent / "fake_apactl.py"
    driver = ("import sys; import apactl.workflows.sweep_plan as sp; "
              f"sp.local_program = lambda: [sys.executable, {str(fake)!r}]; "
              "from apactl.cli import app; "
              f"app(['sweep', {TINY!r}, '--grid', 'run.seed=9', 'algo.name=apa', "
              f"'run.output_dir={root}'])")
    sweep = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    pid_file = root / "run.seed=9" / "pid"
    deadline = time.time() + 60
    while time.time() < deadline and not pid_file.exists():
        time.sleep(0.02)
    time.sleep(0.1)
    child = int(pid_file.read_text())
    sweep.kill()
    sweep.wait()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and _running(child):
            time.sleep(0.05)
        assert not _running(child), "the run outlived its sweep"
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)


def test_emitted_slurm_script_passes_the_early_sigterm_to_the_run(tmp_path, monkeypatch):
    # SLURM's --signal=B:TERM@N signals the batch shell only: the run must be that process.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apactl").write_text(
        f"#!/bin/bash\ntrap 'echo got-TERM > {tmp_path}/seen; exit 143' TERM\n"
        f"touch {tmp_path}/started\nfor i in $(seq 200); do sleep 0.05; done\n")
    (bin_dir / "apactl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    assert invoke(TINY, "--grid", "run.seed=0,1", f"run.output_dir={root}",
                  "--emit", "slurm").exit_code == 0
    assert "\n#SBATCH --signal=B:TERM@" in (root / "sweep.sbatch").read_text()
    job = subprocess.Popen(["bash", str(root / "sweep.sbatch")],
                           env={**os.environ, "SLURM_ARRAY_TASK_ID": "1"})
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not (tmp_path / "started").exists():
            time.sleep(0.02)
        job.send_signal(signal.SIGTERM)  # what SLURM does, to the batch shell's pid
        assert job.wait(timeout=10) == 143
        assert (tmp_path / "seen").read_text() == "got-TERM\n"
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
