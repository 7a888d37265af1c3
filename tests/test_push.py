"""``apactl push``: which files go up, the upload call checked against huggingface_hub's own
signatures (HfApi methods replaced, no network), dry run, and the offline / no-token errors."""

from __future__ import annotations

import inspect

import huggingface_hub as hub
import pytest
from helpers import cli
from huggingface_hub import HfApi, constants


def fake_align_run(root):
    """An align run folder as apactl leaves it, with things that must never be uploaded."""
    for what in ("policy", "critic"):
        f = root / "final" / what
        f.mkdir(parents=True)
        for name, size in (("config.json", 10), ("model.safetensors", 2000),
                           ("tokenizer.json", 30), ("tokenizer_config.json", 5),
                           ("chat_template.jinja", 4), ("README.md", 50), ("recipe.yaml", 20),
                           ("optimizer.pt", 4000), ("trainer_state.pt", 100)):
            (f / name).write_bytes(b"x" * size)
        (f / "sub").mkdir()
        (f / "sub" / "model.safetensors").write_bytes(b"y")
    ck = root / "checkpoints" / "step-00000002" / "policy"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"z")
    (root / "recipe.yaml").write_text("kind: align\n")
    return root


UPLOADED = ["README.md", "chat_template.jinja", "config.json", "model.safetensors",
            "recipe.yaml", "tokenizer.json", "tokenizer_config.json"]


def snapshot(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's repo, branch and upload methods replaced by recorders that bind their
    arguments to the real methods' signatures (a wrong keyword fails the test)."""
    calls = []

    def recorder(name):
        real = getattr(HfApi, name)

        def fake(self, *args, **kwargs):
            inspect.signature(real).bind(self, *args, **kwargs)
            calls.append((name, args, kwargs))
            return "https://huggingface.co/me/tiny/commit/abc" if name == "upload_folder" \
                else None
        return fake

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, recorder(name))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_test")
    return calls


def test_push_uploads_the_policy_folder_card_weights_tokenizer_recipe_only(tmp_path,
                                                                          hub_calls):
    from huggingface_hub.utils import filter_repo_objects

    run = fake_align_run(tmp_path / "run")
    before = snapshot(run)
    res = cli("push", run, "--repo-id", "me/tiny", "--private", "--revision", "v1")
    assert res.exit_code == 0, res.output
    assert [c[0] for c in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    _, args, kw = hub_calls[0]
    assert args == ("me/tiny",) and kw["private"] is True and kw["exist_ok"] is True
    assert hub_calls[1][2]["branch"] == "v1"
    up = hub_calls[2][2]
    assert up["folder_path"] == str(run / "final" / "policy") and up["repo_id"] == "me/tiny"
    assert up["revision"] == "v1" and sorted(up["allow_patterns"]) == UPLOADED
    # What upload_folder itself would take from the folder with these patterns.
    names = [p.relative_to(run / "final" / "policy").as_posix()
             for p in (run / "final" / "policy").rglob("*") if p.is_file()]
    assert sorted(filter_repo_objects(names, allow_patterns=up["allow_patterns"])) == UPLOADED
    assert "uploaded 7 files" in res.output and snapshot(run) == before

    hub_calls.clear()
    assert cli("push", run, "--repo-id", "me/tiny-critic", "--what", "critic").exit_code == 0
    up = hub_calls[-1][2]
    assert up["folder_path"] == str(run / "final" / "critic") and up["revision"] is None
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]


def test_push_dry_run_lists_files_and_sizes_and_uploads_nothing(tmp_path, hub_calls):
    run = fake_align_run(tmp_path / "run")
    res = cli("push", run, "--repo-id", "me/tiny", "--dry-run")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"would upload {run / 'final' / 'policy'} to me/tiny:"
    assert [ln.split()[0] for ln in lines[1:-1]] == UPLOADED
    assert "model.safetensors" in lines[4] and lines[4].endswith("2.0 kB")
    assert lines[-1].strip() == "7 files, 2.1 kB" and not hub_calls


@pytest.mark.parametrize("offline, token, message", [
    (True, "hf_test", "error: push: offline (HF_HUB_OFFLINE is set): nothing uploaded"),
    (False, None, "error: push: no Hugging Face token (run `hf auth login` or set HF_TOKEN): "
                  "nothing uploaded"),
])
def test_push_offline_or_without_token_is_one_line_exit_2(tmp_path, hub_calls, monkeypatch,
                                                          offline, token, message):
    run = fake_align_run(tmp_path / "run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub, "get_token", lambda: token)
    before = snapshot(run)
    res = cli("push", run, "--repo-id", "me/tiny")
    assert res.exit_code == 2 and res.output.strip() == message
    assert not hub_calls and snapshot(run) == before


@pytest.mark.parametrize("args, message", [
    (["--what", "value"], "error: --what: 'value'; expected policy or critic"),
    (["--what", "critic", "SFT"], "has no critic (only align runs have one)"),
    (["EMPTY"], "no finished model in it (no final/ model folder)"),
])
def test_push_bad_folder_or_what_exit_2(tmp_path, hub_calls, args, message):
    run = fake_align_run(tmp_path / "run")
    sft = tmp_path / "sft" / "final"
    sft.mkdir(parents=True)
    (sft / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    folder = {"SFT": tmp_path / "sft", "EMPTY": tmp_path / "empty"}.get(args[-1], run)
    args = [a for a in args if a not in ("SFT", "EMPTY")]
    res = cli("push", folder, "--repo-id", "me/x", *args)
    assert res.exit_code == 2 and message in res.output and not hub_calls
