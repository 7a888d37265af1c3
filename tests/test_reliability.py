"""Never lose or corrupt a user's work: folder ownership, safe resume, one-line errors.

Each test reproduces a defect found by a hostile-user probe (see the reliability issue) and
checks what happens now. Runs use the tiny random model (seconds each).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import QUIET, ROOT, TINY, cli

from apactl import checkpoint as ckpt
from apactl import run_folder

SFT = str(TINY / "sft.yaml")
FAST = ["train.max_steps=4", "train.save_every=2", "data.max_rows=24", "data.eval_rows=4",
        *QUIET]


def sft(out, *extra, flags=()):
    return cli("sft", SFT, f"run.output_dir={out}", *FAST, *extra, *flags)


def one_error_line(res) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


# ---------------------------------------------------------------------------- 1. ownership
def test_new_run_into_a_finished_run_is_refused_then_overwritten(tmp_path):
    out = tmp_path / "run"
    assert sft(out).exit_code == 0
    recipe_before = (out / "recipe.yaml").read_text()
    line = one_error_line(sft(out, "train.lr=1e-2"))
    assert "--resume" in line and "--overwrite" in line
    assert (out / "recipe.yaml").read_text() == recipe_before  # nothing rewritten
    res = sft(out, "train.lr=1e-2", flags=["--overwrite"])
    assert res.exit_code == 0, res.output
    assert "lr: 0.01" in (out / "recipe.yaml").read_text()


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, lambda d: None, {"step": step}, keep=2)
    just = ckpt.save_checkpoint(tmp_path, 4, lambda d: None, {"step": 4}, keep=2)
    assert just.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-00000004", "step-00000030"]


# ------------------------------------------------------------------------------- 2. resume
def test_resume_refuses_a_changed_recipe_and_keeps_recipe_yaml(tmp_path):
    out = tmp_path / "run"
    assert sft(out, "train.max_steps=2").exit_code == 0  # a finished run with checkpoints
    before = (out / "recipe.yaml").read_text()
    line = one_error_line(sft(out, "train.max_steps=2", "train.lr=1e-5",
                              "train.schedule=linear", flags=["--resume"]))
    assert "train.lr" in line and "train.schedule" in line
    assert (out / "recipe.yaml").read_text() == before
    # Operational keys may change: logging, threads, checkpoint cadence, grad_accum.
    res = sft(out, "train.max_steps=2", "train.save_every=1", "train.grad_accum=2",
              flags=["--resume"])
    assert res.exit_code == 0, res.output


def test_resume_restarts_a_run_killed_before_its_first_checkpoint(tmp_path):
    # What a sweep re-run meets after a kill early in a run: recipe.yaml and some logged
    # steps, nothing to resume from. The same recipe starts again; another one is refused.
    import shutil

    out = tmp_path / "run"
    assert sft(out).exit_code == 0
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints")
    logged = (out / "metrics.jsonl").read_text().splitlines()
    assert logged
    (out / "sweep-stderr.log").write_text("a launcher's log\n")
    line = one_error_line(sft(out, "train.lr=1e-2", flags=["--resume"]))
    assert "no checkpoint to resume" in line and "--overwrite" in line
    res = sft(out, flags=["--resume"])
    assert res.exit_code == 0, res.output
    assert "starts again from the beginning" in " ".join(res.output.split())
    assert (out / "final" / "config.json").exists()
    steps = [json.loads(ln).get("step") for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(logged) and steps == sorted(steps)  # the old logs are gone
    assert (out / "sweep-stderr.log").read_text() == "a launcher's log\n"


def test_resume_with_another_algorithm_is_refused(tmp_path):
    out = tmp_path / "run"
    args = ("align", str(TINY / "align.yaml"), f"run.output_dir={out}", "train.iterations=2",
            "train.rollout_batch_size=4", "train.minibatch_size=4", "data.max_rows=8",
            "generation.max_new_tokens=4", *QUIET)
    assert cli(*args).exit_code == 0
    line = one_error_line(cli(*args, "--algo", "ppo", "--resume"))
    assert "algo.name ('apa' -> 'ppo')" in line and "kl.beta" in line


# ---------------------------------------------------------------------------------- 3. lock
def test_second_process_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".apactl.lock").write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "since": time.time(),
             "start": run_folder.process_start(holder.pid)}))
        line = one_error_line(sft(out))
        assert f"pid {holder.pid}" in line and "in use" in line
        assert sorted(p.name for p in out.iterdir()) == [".apactl.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    res = sft(out)  # the holder is gone: its lock is stale
    assert res.exit_code == 0, res.output
    assert not (out / ".apactl.lock").exists()


# ------------------------------------------------------------------------------ 4. pickles
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_executes_code_from_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert sft(out, "train.max_steps=2").exit_code == 0
    marker = tmp_path / "pwned"
    last = ckpt.latest_checkpoint(out)
    # A well-formed torch archive whose pickle would run `touch` when unpickled.
    torch.save({"format": ckpt.FORMAT, "x": _Payload(marker)}, last / ckpt.STATE)
    for c in ckpt.list_checkpoints(out):  # every checkpoint crafted: nothing good to fall to
        if c != last:
            (c / ckpt.STATE).write_bytes((last / ckpt.STATE).read_bytes())
    res = sft(out, "train.max_steps=2", flags=["--resume"])
    assert not marker.exists()
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    text = " ".join(res.output.split())
    assert "is damaged (it holds objects other than tensors" in text
    assert "no checkpoint to resume" in text and "weights_only" not in text


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    assert sft(out, "train.max_steps=4", "train.keep_checkpoints=3").exit_code == 0
    latest = ckpt.latest_checkpoint(out)
    (latest / ckpt.STATE).write_bytes(b"not a checkpoint")
    res = sft(out, "train.max_steps=4", "train.keep_checkpoints=3", flags=["--resume"])
    assert res.exit_code == 0, res.output
    text = res.output.replace("\n", "")  # the console wraps long lines at 80 columns
    assert "damaged" in text and "resumed from" in text
    assert "step-00000002" in text


# ---------------------------------------------------------------------- 5. no tracebacks
@pytest.mark.parametrize("extra, expected", [
    (["data.source=[a"], "override 'data.source=[a': not a valid value"),
    (["train.batch_size=1000"], "train.batch_size: 1000 is larger than the"),
    (["model.lora.target_modules=[nope_proj]"], "lora.target_modules:"),
    (["model.name_or_path=nobody/nomodel"], "nobody/nomodel:"),
    (["model.name_or_path=./no/such/folder"], "model.name_or_path: file not found"),
    (["trian.lr=1e-5"], "trian: unknown key; did you mean train?"),
    (["data.max_len=5000", "data.max_prompt_len=100"], "data.max_len = 5000 tokens, more than"),
])
def test_user_errors_are_one_line(tmp_path, extra, expected):
    out = tmp_path / "run"
    line = one_error_line(sft(out, *extra))
    assert expected in line, line
    assert not (out / "recipe.yaml").exists()  # a run that never started wrote nothing


def test_divergence_to_nan_is_one_line(tmp_path):
    assert "diverged" in one_error_line(sft(tmp_path / "run", "train.lr=1e12",
                                            "train.max_steps=6"))


def test_judge_arg_of_the_wrong_type_is_one_line(tmp_path):
    res = cli("align", str(TINY / "align.yaml"), f"run.output_dir={tmp_path}",
              "reward.args={chars: 5}", *QUIET)
    assert "judge 'char-fraction': args {'chars': 5}" in one_error_line(res)


def test_disk_full_during_a_save_says_so_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = torch.save
    calls = {"n": 0}

    def full(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint: the disk filled up
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 "
                               "vs 0")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    res = sft(out, "train.save_every=1")
    assert res.exit_code == 1 and "no space left on the device" in res.output, res.output
    assert "Traceback" not in res.output
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001"]


def test_bad_recipe_files_are_named(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("kind: sft\ndata: {source: 'builtin:sft'}\ntrain:\n  lr: 1\n  lr: 2\n")
    assert "(line 5): found duplicate key lr" in one_error_line(cli("sft", dup))
    lst = tmp_path / "list.yaml"
    lst.write_text("- kind: sft\n")
    assert "must be a mapping" in one_error_line(cli("sft", lst))


@pytest.mark.parametrize("content, expected", [
    ("", "is empty; expected a mapping of sections"),
    ("# nothing but a comment\n", "is empty; expected a mapping of sections"),
    ("null\n", "is empty; expected a mapping of sections"),
    ("42\n", "must be a mapping of sections (kind:, run:, ...) at the top level, not a single "
              "value (int)"),
    ("hello\n", "at the top level, not a single value ('hello')"),
    (None, "is a directory; expected a recipe file (.yaml)"),
])
def test_a_recipe_that_is_not_a_mapping_says_what_it_is(tmp_path, content, expected):
    # Before: "kind: missing", "cannot parse (line ?): Invalid loaded object type: int", and
    # "file not found" for a directory.
    path = tmp_path / "recipe.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    line = one_error_line(cli("sft", path))
    assert line == f"error: recipe: {path} {expected}" or (
        line.startswith(f"error: recipe: {path} ") and expected in line), line


# ---------------------------------------------------------------- 7. silent divergence
def test_divergence_without_nan_is_warned_once(tmp_path):
    res = sft(tmp_path / "run", "train.lr=1e3", "train.max_steps=24", "train.max_grad_norm=null")
    assert res.exit_code == 0, res.output
    warned = [ln for ln in res.output.splitlines() if "warning:" in ln]
    assert warned and any("diverging" in w or "not moved" in w or "exactly 0" in w
                          for w in warned), res.output
    assert len(warned) == len(set(warned))


# ---------------------------------------------------------------------------- 8. smaller
def test_resume_of_a_finished_run_logs_the_final_eval_once(tmp_path):
    out = tmp_path / "run"
    assert sft(out).exit_code == 0
    before = (out / "metrics.jsonl").read_text()
    assert sft(out, flags=["--resume"]).exit_code == 0
    assert (out / "metrics.jsonl").read_text() == before


def test_stale_temporary_folders_are_cleaned(tmp_path):
    out = tmp_path / "run"
    assert sft(out).exit_code == 0
    dead = out / ".final.tmp-999999999"
    dead.mkdir()
    assert sft(out, flags=["--resume"]).exit_code == 0
    assert not dead.exists()


def test_cli_module_is_importable_without_torch():
    code = "import sys, apactl.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------------------ kill tests
@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, kind):
    """A real SIGKILL once a checkpoint exists; --resume ends with the uninterrupted run's
    metrics and weights (the align version is in test_align_e2e.py)."""
    from safetensors.torch import load_file

    from apactl.metrics import read_metrics

    def cmd(out):
        return [sys.executable, "-m", "apactl", kind, str(TINY / f"{kind}.yaml"),
                f"run.output_dir={out}", "train.max_steps=12", "train.save_every=1",
                "data.max_rows=40", "data.eval_rows=8", *QUIET]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "a"), env=env, check=True, capture_output=True, timeout=300)
    out = tmp_path / "b"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints/step-00000003").exists():
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    res = subprocess.run(cmd(out) + ["--resume"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = read_metrics(tmp_path / "a"), read_metrics(out)
    assert [r["step"] for r in b] == [r["step"] for r in a]  # every step logged once
    key = "train/loss"
    for ra, rb in zip(a, b):
        if key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), ra["step"]
    wa = load_file(tmp_path / "a/final/model.safetensors")
    wb = load_file(out / "final/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _iteration_metrics(eos_rate: float) -> dict[str, float]:
    return {"kl/ref_k1": 0.1, "policy/entropy": 1.0, "response/eos_rate": eos_rate}


@pytest.mark.parametrize("eos_rates, warned", [
    ([0.0] * 4, False),                    # too early to tell
    ([0.0] * 5, True),                     # nothing ended in the first 5 iterations
    ([0.0] * 12, True),                    # ... and it is said once
    ([0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0], False),  # one answer ended: the limit can be met
    ([0.0, 0.0, 0.0, 0.0, 0.0, 0.5], True),         # an end after the first 5: still said
])
def test_maxlen_warning_needs_five_iterations_without_an_end(eos_rates, warned):
    from apactl.rl.loop import Warnings

    said: list[str] = []
    w = Warnings(said.append)
    for rate in eos_rates:
        w.check(_iteration_metrics(rate), max_new_tokens=32)
    assert said == ([
        "responses never end before generation.max_new_tokens=32: raise it if answers should "
        "be complete; short, cut answers are fine for a quick run"] if warned else [])


# ------------------------------------------------- 5. inputs that look valid (issue 20)
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An SFT-like run folder (a causal LM in final/) and a reward model (a sequence classifier
    with its score head; reward_stats.json written per test)."""
    from apactl.models import load_sequence_classifier, save_model
    from apactl.testing import save_tiny_model

    root = tmp_path_factory.mktemp("inputs")
    sft_run = root / "sft-run"
    save_tiny_model(sft_run / "final")
    model, tok = load_sequence_classifier(str(sft_run), "cpu", torch.float32, trainable=False)
    rm = save_model(model, tok, root / "rm")
    return {"sft": sft_run, "rm": rm}


ALIGN_FAST = ["train.iterations=1", "train.rollout_batch_size=4", "train.minibatch_size=4",
              "data.max_rows=8", "generation.max_new_tokens=4", *QUIET]


def reward_model_recipe(tmp_path, kind: str, key: str, path) -> str:
    """recipes/tiny/<kind>.yaml with ``<key>: {name: reward-model, path: PATH}`` (the toy
    judge's args cannot be removed by an override)."""
    import yaml

    data = yaml.safe_load((TINY / f"{kind}.yaml").read_text())
    data[key] = {"name": "reward-model", "path": str(path)}
    recipe = tmp_path / f"{kind}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    return str(recipe)


@pytest.mark.parametrize("kind, overrides, field", [
    ("align", ["reward={sft}"], "reward.path"),
    ("align", ["reward=tiny-random", "critic.init=reward"], "reward.path"),
    ("align", ["eval_judges=[{name: reward-model, path: '{sft}'}]"], "eval_judges.0.path"),
    ("align", ["critic.init={sft}"], "critic.init"),
    ("eval", ["judges=[{name: reward-model, path: '{sft}'}]"], "judges.0.path"),
    ("label", ["judge={sft}"], "judge.path"),
])
def test_a_causal_lm_is_not_accepted_as_a_reward_model(tmp_path, folders, kind, overrides,
                                                       field):
    # Before: loaded as a sequence classifier with a random score head, exit 0, no word.
    out = tmp_path / "out"
    extra = ALIGN_FAST if kind == "align" else QUIET
    overrides = [o.replace("{sft}", str(folders["sft"])) for o in overrides]
    recipe = TINY / f"{kind}.yaml"
    key, _, path = overrides[0].partition("=")
    if key in ("reward", "judge"):  # a reward-model judge in place of the toy one
        recipe = reward_model_recipe(tmp_path, kind, key, path)
        overrides.pop(0)
    res = cli(kind, recipe, f"run.output_dir={out}", *extra, *overrides)
    line = one_error_line(res)
    assert line.startswith(f"error: {field}: "), line
    assert "a causal LM (LlamaForCausalLM), not a reward model" in line, line
    assert not (out / "final").exists()


@pytest.mark.parametrize("stats, expected", [
    (None, "no reward_stats.json"),
    ("{not json", "malformed, not JSON"),
    ("[1, 2]", "malformed: expected an object"),
    ('{"mean": 0.1}', "malformed: std is None, expected a number"),
    ('{"mean": 0.1, "std": "1"}', "malformed: std is '1', expected a number"),
    ('{"mean": 0.1, "std": 0.0}', "std is 0.0: the scores cannot be normalised"),
    ('{"mean": 0.1, "std": NaN}', "std is nan, not a finite number"),
    ('{"mean": Infinity, "std": 1.0}', "mean is inf, not a finite number"),
])
def test_reward_stats_that_cannot_normalise_are_named(folders, stats, expected):
    # Before: a missing file silently turned normalisation off; a zero or nan std gave inf/nan
    # rewards and a divergence message blaming train.lr; malformed JSON was a traceback.
    from apactl.config import JudgeSpec
    from apactl.errors import ModelError
    from apactl.judges import build_judge

    stats_file = folders["rm"] / "reward_stats.json"
    stats_file.unlink(missing_ok=True)
    if stats is not None:
        stats_file.write_text(stats)
    spec = JudgeSpec(name="reward-model", path=str(folders["rm"]), normalize=True)
    with pytest.raises(ModelError) as err:
        build_judge(spec, field="reward")
    assert str(err.value).startswith(f"reward.path: {folders['rm']}"), err.value
    assert expected in str(err.value) and "\n" not in str(err.value), err.value
    # The same folder with sound statistics, or without normalising, is a reward model.
    stats_file.write_text('{"mean": 0.5, "std": 2.0, "n": 8}')
    judge = build_judge(spec, field="reward")
    raw = build_judge(spec.model_copy(update={"normalize": False}), field="reward")
    msgs = [[{"role": "user", "content": "hi"}]] * 2
    scores, raw_scores = judge.score_tensor(msgs, ["a", "bb"]), raw.score_tensor(msgs, ["a", "bb"])
    torch.testing.assert_close(scores, (raw_scores - 0.5) / 2.0)


def test_zero_std_reward_stats_stop_align_with_one_line(tmp_path, folders):
    (folders["rm"] / "reward_stats.json").write_text('{"mean": 0.0, "std": 0.0}')
    res = cli("align", reward_model_recipe(tmp_path, "align", "reward", folders["rm"]),
              f"run.output_dir={tmp_path / 'out'}", *ALIGN_FAST)
    line = one_error_line(res)
    assert line.startswith("error: reward.path: ") and "std is 0.0" in line, line
    assert "train.lr" not in res.output


@pytest.mark.parametrize("scores, episodes, warned", [
    ([(0.25, 0.0)], 16, True),                  # every response scored the same
    ([(1e6, 1e-3)], 16, True),                  # ... up to float noise on a large score
    ([(0.25, 0.3), (0.25, 0.0), (0.3, 0.0)], 16, True),  # said once
    ([(0.25, 0.3)] * 5, 16, False),             # a reward that varies
    ([(0.25, 0.0)], 1, False),                  # one response has no spread to speak of
])
def test_a_constant_reward_over_a_rollout_is_warned_once(scores, episodes, warned):
    # Before: align said nothing when the judge gave every response the same score.
    from apactl.rl.loop import Warnings

    said: list[str] = []
    w = Warnings(said.append)
    for mean, std in scores:
        w.check({**_iteration_metrics(1.0), "reward/score_mean": mean, "reward/score_std": std},
                max_new_tokens=32, episodes=episodes)
    assert len(said) == int(warned), said
    assert all(f"all {episodes} responses of a rollout got the same score" in m for m in said)


def test_align_warns_when_the_reward_is_constant(tmp_path):
    # A judge that scores every response 0 (helpers.fail_on_rank, on a rank that never exists).
    res = cli("align", TINY / "align.yaml", f"run.output_dir={tmp_path / 'out'}", *ALIGN_FAST,
              "reward.name=helpers:fail_on_rank", "reward.args.rank=99")
    assert res.exit_code == 0, res.output
    assert res.output.count("all 4 responses of a rollout got the same score (0)") == 1, \
        res.output


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_few_preference_rows_do_not_turn_an_sft_file_into_preferences(tmp_path, mode):
    # Before: read as 'preference' (the union of the columns); error mode blamed valid row 0,
    # skip mode trained on the 8 preference rows and dropped the 40 sft ones, exit 0.
    from helpers import write_jsonl

    sft_rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    pref = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "mixed.jsonl", sft_rows[:20] + pref + sft_rows[20:])
    line = one_error_line(sft(tmp_path / "out", f"data.source={data}", "data.max_rows=null",
                              "data.eval_rows=0", f"data.on_bad_row={mode}"))
    expected = ("row 20: field 'response': missing" if mode == "error" else
                "8 of 48 rows are bad (17%), more than data.max_bad_fraction=0.1")
    assert line.startswith(f"error: {data}: {expected}"), line
    assert not (tmp_path / "out" / "final").exists()


def test_a_classifier_config_over_causal_lm_weights_is_refused(tmp_path, folders,
                                                               monkeypatch):
    # config.json says sequence classifier, but the safetensors hold no score head: read from
    # the file's header, before any weight is loaded.
    import shutil

    from apactl.config import JudgeSpec
    from apactl.errors import ModelError
    from apactl.judges import build_judge

    fake = tmp_path / "fake-rm"
    shutil.copytree(folders["sft"] / "final", fake)
    config = json.loads((fake / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as err:
        build_judge(JudgeSpec(name="reward-model", path=str(fake)), field="judges.1")
    assert str(err.value) == (
        f"judges.1.path: {fake}: its weights hold no score head (LlamaForSequenceClassification)"
        ", not a reward model (a sequence classifier with a trained score head, from apactl rm)")
    # Where the folder cannot be read first (a hub id), the loaded checkpoint's missing head
    # says the same.
    for module in ("apactl.judges.reward_model", "apactl.models.loading"):
        monkeypatch.setattr(f"{module}.check_trained_head", lambda ref, resolved: None)
    with pytest.raises(ModelError) as err:
        build_judge(JudgeSpec(name="reward-model", path=str(fake)), field="judges.1")
    assert str(err.value).startswith(
        f"judges.1.path: {fake}: the checkpoint has no score.weight: not a reward model"), err.value
# ------------------------------------------------------- issue 20: folders, locks, SIGTERM
@pytest.mark.parametrize("content", ["", '{"pid": 12', "5", "null", "[1, 2]", '{"pid": 0}',
                                     '{"pid": -1}', '{"pid": "12"}', '{"pid": true}'])
def test_an_unusable_lock_is_taken_over_with_a_line(tmp_path, content, capsys):
    # A crash or a full disk while writing the lock, or a hand-edited one: it names no live
    # process (pid 0 or -1 would "exist" for os.kill: the process group, every process).
    (tmp_path / run_folder.LOCK).write_text(content)
    os.utime(tmp_path / run_folder.LOCK, (time.time() - 5,) * 2)  # not one being written now
    lock = run_folder.Lock(tmp_path)
    lock.acquire()
    assert lock.held and json.loads((tmp_path / run_folder.LOCK).read_text())["pid"] == os.getpid()
    assert "stale lock taken over" in " ".join(capsys.readouterr().err.split())
    lock.release()
    assert not (tmp_path / run_folder.LOCK).exists()


def test_a_lock_whose_pid_is_another_process_is_taken_over(tmp_path, capsys):
    other = subprocess.Popen(["sleep", "60"])  # alive, but not the lock's writer
    me = {"pid": other.pid, "host": socket.gethostname(), "since": time.time()}
    try:
        for lock in ({**me, "start": run_folder.process_start(other.pid) + 1},  # pid reused
                     me):  # an older apactl's lock (no start time): the command line tells
            (tmp_path / run_folder.LOCK).write_text(json.dumps(lock))
            held = run_folder.Lock(tmp_path)
            held.acquire()
            held.release()
        said = " ".join(capsys.readouterr().err.split())
        assert f"pid {other.pid} is now another process" in said
        assert f"pid {other.pid} is not an apactl process" in said
    finally:
        other.kill()
        other.wait()


def test_an_empty_lock_left_by_a_full_disk_does_not_block_the_next_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".apactl.lock").write_text("")
    os.utime(out / ".apactl.lock", (time.time() - 5,) * 2)  # not one being written now
    res = sft(out, "train.max_steps=2")
    assert res.exit_code == 0, res.output
    assert "stale lock taken over (empty file)" in " ".join(res.output.split())


def test_output_dir_that_cannot_be_a_run_folder_is_one_line(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine\n")
    assert "is a file, not a folder" in one_error_line(sft(a_file))
    assert "lies under" in one_error_line(sft(a_file / "run"))
    assert "cannot create" in one_error_line(sft("/proc/no-such-dir/run"))
    assert a_file.read_text() == "mine\n"
    other = tmp_path / "other"
    assert sft(other, "train.max_steps=2", "train.keep_checkpoints=2").exit_code == 0
    before = sorted(p.relative_to(other) for p in other.rglob("*"))
    for inside in (other / "checkpoints", other / "final", other / "final" / "x", other / "sub"):
        line = one_error_line(sft(inside, flags=["--overwrite"]))
        assert f"lies inside the run folder {other}" in line, line
    assert sorted(p.relative_to(other) for p in other.rglob("*")) == before  # nothing deleted


def test_resume_and_overwrite_together_is_a_usage_error(tmp_path):
    out = tmp_path / "run"
    assert sft(out, "train.max_steps=2").exit_code == 0
    line = one_error_line(sft(out, "train.max_steps=2", flags=["--resume", "--overwrite"]))
    assert "--resume and --overwrite" in line
    assert (out / "final").is_dir()


def test_a_crafted_newest_state_is_skipped_like_a_damaged_one(tmp_path):
    out = tmp_path / "run"
    args = ("train.max_steps=4", "train.keep_checkpoints=3")
    assert sft(out, *args).exit_code == 0
    latest = ckpt.latest_checkpoint(out)
    marker = tmp_path / "pwned"
    torch.save({"format": ckpt.FORMAT, "x": _Payload(marker)}, latest / ckpt.STATE)
    res = sft(out, *args, flags=["--resume"])
    assert res.exit_code == 0, res.output
    text = res.output.replace("\n", "")  # the console wraps long lines at 80 columns
    assert f"checkpoint {latest} is damaged" in text and "resumed from" in text
    assert "step-00000002" in text and "weights_only" not in text and not marker.exists()


ALIGN = ("align", str(TINY / "align.yaml"), "train.iterations=2", "train.rollout_batch_size=4",
         "train.minibatch_size=4", "data.max_rows=8", "generation.max_new_tokens=4", *QUIET)


def test_resume_may_add_a_held_out_judge_and_names_another_kind_first(tmp_path):
    out = tmp_path / "run"
    assert cli(*ALIGN, f"run.output_dir={out}").exit_code == 0
    res = cli(*ALIGN, f"run.output_dir={out}", "eval_judges=[{name: char-fraction}]",
              "--resume")
    assert res.exit_code == 0, res.output
    sft_out = tmp_path / "sft"
    assert sft(sft_out, "train.max_steps=2").exit_code == 0
    line = one_error_line(cli(*ALIGN, f"run.output_dir={sft_out}", "--resume"))
    assert line.startswith(f"error: --resume: {sft_out} holds a run of kind 'sft', not "
                           "'align'"), line
    line = one_error_line(sft(sft_out, "train.max_steps=3", flags=["--resume"]))
    assert "train.max_steps (2 -> 3)" in line and "length cannot change on resume" in line


def test_stop_flag_first_sigterm_asks_second_one_leaves():
    from apactl.errors import Terminated
    from apactl.runtime import stop_on_sigterm
    from apactl.training import STOP

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        assert STOP.signal == "SIGTERM"
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
    assert STOP.signal is None and signal.getsignal(signal.SIGTERM) == before


# align shares the stop check's code path (training.stop_requested) and costs 3 more runs.
@pytest.mark.parametrize("kind", ["sft", pytest.param("align", marks=pytest.mark.slow)])
def test_sigterm_checkpoints_releases_the_lock_and_resumes_identically(tmp_path, kind):
    """A real SIGTERM mid-run (no periodic checkpoints): the run finishes its step, writes a
    checkpoint, releases the lock, says how to resume; --resume then ends with the weights of
    an uninterrupted run."""
    from safetensors.torch import load_file

    from apactl.metrics import read_metrics

    n = 12 if kind == "sft" else 6
    length = "train.max_steps" if kind == "sft" else "train.iterations"
    extra = ["data.max_rows=40", "data.eval_rows=8"] if kind == "sft" else list(ALIGN[3:])

    args = [kind, str(TINY / f"{kind}.yaml"), *extra, f"{length}={n}", "train.save_every=100",
            *QUIET]
    assert cli(*args, f"run.output_dir={tmp_path / 'a'}").exit_code == 0  # uninterrupted
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "apactl", *args, f"run.output_dir={out}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(out)) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    said = " ".join((stdout + stderr).split())
    assert proc.returncode == 143, said[-2000:]
    [stop] = [ln for ln in stderr.splitlines() if ln.startswith("stopped: SIGTERM after step")]
    step = int(stop.split("after step ")[1].split(":")[0])
    assert 2 <= step < n and "resume with: apactl" in stop and stop.endswith(" --resume")
    assert [c.name for c in ckpt.list_checkpoints(out)] == [f"step-{step:08d}"]
    assert not (out / ".apactl.lock").exists() and not (out / "final").exists()
    res = cli(*args, f"run.output_dir={out}", "--resume")
    assert res.exit_code == 0, res.output
    assert f"(step {step})" in res.output
    assert [r["step"] for r in read_metrics(out)] == [r["step"] for r in read_metrics(
        tmp_path / "a")]
    sub = "" if kind == "sft" else "policy/"
    wa = load_file(tmp_path / f"a/final/{sub}model.safetensors")
    wb = load_file(out / f"final/{sub}model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_checkpoint_of_an_earlier_version_resumes_when_new_keys_keep_their_defaults():
    # A checkpoint written before a key existed lacks it: the earlier version computed what the
    # default computes, so only a non-default value of the new key is a change.
    from apactl.recipe import load_recipe
    from apactl.run_folder import field_defaults, recipe_changes

    recipe = load_recipe(TINY / "align.yaml")
    current = recipe.model_dump(mode="json")
    stored = json.loads(json.dumps(current))
    del stored["generation"]["samples_per_prompt"], stored["algo"]["advantage"]
    del stored["data"]["max_bad_fraction"]
    defaults = field_defaults(recipe)
    assert defaults["generation.samples_per_prompt"] == 1 and defaults["algo.advantage"] == "gae"
    assert recipe_changes(stored, current, defaults) == []
    assert "generation.samples_per_prompt" in recipe_changes(stored, current)  # without them
    other = load_recipe(TINY / "align.yaml", ["generation.samples_per_prompt=2",
                                              "train.rollout_batch_size=8"])
    changed = recipe_changes(stored, other.model_dump(mode="json"), field_defaults(other))
    assert "generation.samples_per_prompt" in changed


@pytest.mark.parametrize("kind", ["sft", "rm", "dpo", "align"])
def test_every_training_command_stops_on_sigterm(monkeypatch, kind):
    # The stop flag is checked by the loops; the CLI must install the handler for every
    # command that trains (dpo once lacked it: SIGTERM killed it with no checkpoint).
    import importlib

    seen = []

    def run(recipe, resume=False, overwrite=False):
        seen.append(signal.getsignal(signal.SIGTERM))

    monkeypatch.setattr(importlib.import_module(f"apactl.workflows.{kind}"), f"run_{kind}", run)
    before = signal.getsignal(signal.SIGTERM)
    assert cli(kind, str(TINY / f"{kind}.yaml"), *QUIET).exit_code == 0
    assert len(seen) == 1 and seen[0] not in (before, signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) == before
