"""apactl.data: loading, shape detection, validation, splitting, rendering, tokenising, batching.

Fixtures are tiny files under tests/fixtures/data; gzip and parquet copies are written to
tmp_path. Nothing touches the network (the hub path is exercised with a stubbed loader).
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl

from apactl import data as D
from apactl.config import DataConfig, FieldMap
from apactl.testing import make_tiny_tokenizer

FIX = Path(__file__).parent / "fixtures" / "data"


def cfg(name: str | Path, **kw) -> DataConfig:
    source = str(name if isinstance(name, Path) else FIX / name)
    if kw.get("on_bad_row") == "skip":  # tiny files, many bad rows: what skip reports is tested
        kw.setdefault("max_bad_fraction", 1.0)  # here, its limit in tests/test_data_fuzz.py
    return DataConfig(source=source, **kw)


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------- detection
@pytest.mark.parametrize(
    ("name", "kind", "fmt", "n"),
    [
        ("sft.jsonl", "sft", "sft", 5),
        ("chat.jsonl", "sft", "chat", 3),
        ("prefs.jsonl", "preference", "preference", 3),
        ("hh.jsonl", "preference", "hh", 4),
        ("prompts.csv", "prompt", "prompt", 4),
    ],
)
def test_auto_detects_each_shape(name, kind, fmt, n):
    train, held_out, report = D.load_examples(cfg(name), kind)
    assert report.format == fmt
    assert (len(train), held_out, report.n_train, report.total_rows) == (n, [], n, n)
    assert [e.row for e in train] == list(range(n))


def test_sft_and_chat_examples():
    train, _, _ = D.load_examples(cfg("sft.jsonl"), "sft")
    assert train[0] == D.SFTExample([user("What is the capital of France?")], "Paris.", 0)
    chat, _, _ = D.load_examples(cfg("chat.jsonl"), "sft")
    assert chat[0].messages == [{"role": "system", "content": "Be brief."}, user("Hi!")]
    assert chat[0].response == "Hello."
    assert chat[1].messages == [user("2+2?"), bot("4"), user("And 3+3?")]
    assert chat[1].response == "6"


def test_preference_prompt_string_or_messages():
    train, _, _ = D.load_examples(cfg("prefs.jsonl"), "preference")
    assert train[0].messages == [user("Is water wet?")]
    assert train[1].messages == [user("Hi"), bot("Hello!"), user("Tell me a fact.")]
    assert (train[1].chosen, train[1].rejected) == ("Honey never spoils.", "Facts are boring.")


def test_csv_cells_stay_text():
    train, _, _ = D.load_examples(cfg("prompts.csv"), "prompt")
    assert train[1].messages == [user("Explain, in one line, what a CPU does.")]
    assert train[2].messages == [user("007")]
    assert train[3].messages == [user('Say "hello" politely.')]


def test_undetectable_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(D.DataError) as err:
        D.load_examples(cfg(path), "sft")
    assert str(err.value) == (f"{path}: row 0: field 'prompt': missing; columns: question, answer "
                              "(cannot detect the data format; set data.format or data.fields)")


def test_format_incompatible_with_kind():
    with pytest.raises(D.DataError, match="format 'sft' cannot give preference examples"):
        D.load_examples(cfg("sft.jsonl"), "preference")


# -------------------------------------------------------------------------------- HH
def test_parse_hh_multi_turn():
    text = ("\n\nHuman: My plants are yellow.\n\nAssistant: Top or bottom?"
            "\n\nHuman: Bottom.\n\nAssistant: Probably old leaves.")
    messages, reply = D.parse_hh(text)
    assert messages == [user("My plants are yellow."), bot("Top or bottom?"), user("Bottom.")]
    assert reply == "Probably old leaves."


def test_parse_hh_merges_repeated_speaker_and_rejects_junk():
    messages, reply = D.parse_hh("\n\nHuman: a\n\nHuman: b\n\nAssistant: c")
    assert (messages, reply) == ([user("a\n\nb")], "c")
    for bad in ["no turns at all", "\n\nHuman: only a question", "\n\nHuman: q\n\nAssistant:"]:
        with pytest.raises(ValueError):
            D.parse_hh(bad)


def test_hh_file_gives_shared_prompt_and_final_replies():
    train, _, _ = D.load_examples(cfg("hh.jsonl"), "preference")
    assert train[0].messages == [user("What is a good way to keep basil fresh?")]
    assert train[0].rejected == "Put it in the freezer."
    ex = train[2]
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert ex.messages[0] == user("My tomato plants have yellow leaves.")
    assert ex.messages[-1] == user("How do I tell the difference?")
    assert ex.chosen == "Blight leaves have brown spots with rings; old leaves just fade."
    assert ex.rejected == "Pull the plant out."


def test_hh_gz_matches_plain(tmp_path):
    gz = tmp_path / "hh.jsonl.gz"
    with open(FIX / "hh.jsonl", "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain, _, _ = D.load_examples(cfg("hh.jsonl"), "preference")
    zipped, _, report = D.load_examples(cfg(gz), "preference")
    assert zipped == plain and report.format == "hh"


def test_hh_rows_as_prompts():
    train, _, report = D.load_examples(cfg("hh.jsonl"), "prompt")
    assert report.format == "hh"
    assert isinstance(train[1], D.PromptExample)
    assert train[1].messages[-1] == user(
        "About two hours, and no more than thirty minutes of driving.")


def test_hh_prompts_differ_is_bad_row(tmp_path):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: X\n\nAssistant: c"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(D.DataError, match=r"hh\.jsonl: row 0: field 'rejected': the dialogue"):
        D.load_examples(cfg(path), "preference")


# --------------------------------------------------------------- files, remapping, splits
def test_parquet_chat(tmp_path):
    from datasets import Dataset

    path = tmp_path / "chat.parquet"
    rows = [{"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(4)]
    Dataset.from_list(rows).to_parquet(str(path))
    train, _, report = D.load_examples(cfg(path), "sft")
    assert report.format == "chat"
    assert [(e.messages, e.response) for e in train] == [([user(f"q{i}")], f"a{i}")
                                                         for i in range(4)]
    gz = tmp_path / "chat.parquet.gz"
    with open(path, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    assert D.load_examples(cfg(gz), "sft")[0] == train


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "p0"}, {"prompt": "p1"}]))
    train, _, report = D.load_examples(cfg(path), "prompt")
    assert report.format == "prompt" and [e.messages[0]["content"] for e in train] == ["p0", "p1"]


def test_field_remapping(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    fields = FieldMap(prompt="question", response="answer")
    train, _, report = D.load_examples(cfg(path, fields=fields), "sft")
    assert report.format == "sft"
    assert train[2] == D.SFTExample([user("q2")], "a2", 2)
    bad = write_jsonl(tmp_path / "qa_bad.jsonl", [{"question": "q", "answer": ""}])
    with pytest.raises(D.DataError, match="row 0: field 'answer': empty text"):
        D.load_examples(cfg(bad, fields=fields), "sft")


def test_max_rows_keeps_first_rows():
    train, _, report = D.load_examples(cfg("sft.jsonl", max_rows=2), "sft")
    assert [e.row for e in train] == [0, 1] and report.total_rows == 2


def test_eval_rows_takes_the_last_rows():
    train, held_out, report = D.load_examples(cfg("sft.jsonl", eval_rows=2), "sft")
    assert [e.row for e in train] == [0, 1, 2]
    assert [e.row for e in held_out] == [3, 4]
    assert held_out[-1].response == "Eight."
    assert (report.n_train, report.n_eval) == (3, 2)


def test_eval_fraction():
    train, held_out, _ = D.load_examples(cfg("sft.jsonl", eval_fraction=0.4), "sft")
    assert [e.row for e in train] == [0, 1, 2] and [e.row for e in held_out] == [3, 4]
    train, held_out, _ = D.load_examples(cfg("sft.jsonl", max_rows=4, eval_fraction=0.1), "sft")
    assert len(train) == 3 and [e.row for e in held_out] == [3]  # at least one row held out


def test_eval_leaving_no_training_rows():
    with pytest.raises(D.DataError, match="holding out 5 of 5 rows"):
        D.load_examples(cfg("sft.jsonl", eval_rows=5), "sft")


def test_eval_split_of_a_local_source_is_a_file():
    train, held_out, report = D.load_examples(
        cfg("sft.jsonl", eval_split=str(FIX / "chat.jsonl")), "prompt")
    assert (len(train), len(held_out), report.total_rows) == (5, 3, 8)
    assert held_out[1].messages == [user("2+2?"), bot("4"), user("And 3+3?")]


def test_hub_dataset_path_with_stubbed_loader(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, data_dir=None, split=None):
        calls.append((path, name, data_dir, split))
        return datasets.Dataset.from_list([{"prompt": f"{split}{i}"} for i in range(3)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(D, "hub_reachable", lambda *a, **k: True)  # no network in tests
    c = DataConfig(source="someone/prompts", subset="en", data_dir="d", eval_split="test")
    train, held_out, report = D.load_examples(c, "prompt")
    assert calls == [("someone/prompts", "en", "d", split) for split in ("train", "test")]
    assert report.source == "someone/prompts:en/d[train]"
    assert held_out[0].messages == [user("test0")] and len(train) == 3


def _hub_unreachable(monkeypatch, tmp_path, error: type[BaseException]):
    """Every request to the hub fails as it does on a machine without network; the datasets
    cache is an empty folder."""
    import datasets
    import huggingface_hub
    from huggingface_hub import file_download

    def fail(*args, **kwargs):
        raise error("[Errno -2] Name or service not known")

    for owner, name in [(huggingface_hub.HfApi, "repo_info"),
                        (huggingface_hub.HfApi, "dataset_info"),
                        (huggingface_hub.HfApi, "model_info"),
                        (huggingface_hub.HfApi, "hf_hub_download"),
                        (huggingface_hub, "hf_hub_download"),
                        (file_download, "hf_hub_download")]:
        monkeypatch.setattr(owner, name, fail)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def _connect_errors() -> list[type[BaseException]]:
    """The errors huggingface_hub raises without network: its HTTP client's ConnectError
    (httpx or its fork httpx2, whichever it uses) and OfflineModeIsEnabled."""
    from huggingface_hub import hf_api
    from huggingface_hub.errors import OfflineModeIsEnabled

    client = getattr(hf_api, "httpx2", None) or hf_api.httpx
    return [client.ConnectError, OfflineModeIsEnabled]


@pytest.mark.parametrize("error", _connect_errors(), ids=lambda e: e.__name__)
def test_hub_dataset_offline_is_one_line_with_the_offline_route(monkeypatch, tmp_path, error):
    from helpers import QUIET, TINY, cli

    _hub_unreachable(monkeypatch, tmp_path, error)
    res = cli("rm", TINY / "rm.yaml", *QUIET, f"run.output_dir={tmp_path / 'out'}",
              "data.source=Anthropic/hh-rlhf", "data.data_dir=harmless-base",
              "data.split=test", "data.format=hh")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    joined = " ".join(" ".join(lines).split())
    assert joined.startswith("error: Anthropic/hh-rlhf/harmless-base[test]: the Hugging Face "
                             "hub cannot be reached"), res.output
    assert "data.source=PATH/test.jsonl.gz" in joined and "None" not in joined
    assert "Retrying" not in res.output


def test_hub_offline_switch_is_named_and_asks_nothing(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    _hub_unreachable(monkeypatch, tmp_path, OfflineModeIsEnabled)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    c = DataConfig(source="Anthropic/hh-rlhf", data_dir="harmless-base", split="test")
    with pytest.raises(D.DataError) as err:
        D.load_rows(c)
    assert str(err.value) == (
        "Anthropic/hh-rlhf/harmless-base[test]: the Hugging Face hub is off (HF_HUB_OFFLINE) "
        "and the dataset is not in the local cache; offline, download its file once "
        "(harmless-base/test.jsonl.gz, or as the dataset names it) and pass "
        "data.source=PATH/test.jsonl.gz")


@pytest.mark.parametrize("error", _connect_errors(), ids=lambda e: e.__name__)
def test_hub_model_offline_is_one_line_with_the_offline_route(monkeypatch, tmp_path, error):
    from helpers import QUIET, TINY, cli

    _hub_unreachable(monkeypatch, tmp_path, error)
    res = cli("sft", TINY / "sft.yaml", *QUIET, f"run.output_dir={tmp_path / 'out'}",
              "model.name_or_path=someone/not-cached-model")
    assert res.exit_code == 2, res.output
    joined = " ".join(res.output.split())
    assert joined.startswith("error: someone/not-cached-model: not a local folder, not in the "
                             "Hugging Face cache, and the hub cannot be reached"), res.output
    assert "offline, give a local model folder or .gguf file instead" in joined
    assert "None" not in joined


def test_missing_file():
    with pytest.raises(D.DataError, match=r"nope\.jsonl: file not found"):
        D.load_rows(cfg("nope.jsonl"))


def test_unreadable_line_is_a_bad_row(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n{"prompt": "fine"}\n')
    with pytest.raises(D.DataError) as err:
        D.load_examples(cfg(path), "prompt")
    assert str(err.value) == (f"{path}: row 1: invalid JSON: Expecting value "
                              "(line 2, column 12)")
    train, _, report = D.load_examples(cfg(path, on_bad_row="skip"), "prompt")
    assert [e.row for e in train] == [0, 2] and report.n_skipped == 1


# ------------------------------------------------------------------------------ bad rows
def test_bad_row_error_names_file_row_field():
    with pytest.raises(D.DataError) as err:
        D.load_examples(cfg("bad.jsonl"), "sft")
    assert str(err.value) == (f"{FIX / 'bad.jsonl'}: row 1: field 'response': missing; "
                              "columns: prompt")
    assert (err.value.row, err.value.detail) == (1, "field 'response': missing; columns: prompt")


def test_bad_rows_skipped_and_reported():
    train, _, report = D.load_examples(cfg("bad.jsonl", on_bad_row="skip"), "sft")
    assert [e.row for e in train] == [0, 4]
    assert report.n_skipped == 3 and report.n_train == 2
    src = FIX / "bad.jsonl"
    assert report.skipped == [
        f"{src}: row 1: field 'response': missing; columns: prompt",
        f"{src}: row 2: field 'prompt': empty text",
        f"{src}: row 3: field 'response': expected a string, got int",
    ]
    assert report.skipped_summary() == (
        "3 bad rows skipped: row 1 (field 'response': missing; columns: prompt), "
        "row 2 (field 'prompt': empty text), row 3 (field 'response': expected a string, got int)")
    assert report.summary() == f"{src} (sft): 5 rows, 2 train, 0 eval; " + report.skipped_summary()


def test_bad_messages_name_the_message(tmp_path):
    rows = [{"messages": [user("hi"), {"role": "robot", "content": "x"}]},
            {"messages": [user("hi"), bot("")]},
            {"messages": [user("only a question")]},
            {"messages": [user("hi"), bot("hello")]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    _, _, report = D.load_examples(cfg(path, on_bad_row="skip"), "prompt")
    assert report.n_skipped == 2  # a trailing user turn is a fine prompt
    assert "row 0: field 'messages[1].role': unknown role 'robot'" in report.skipped[0]
    assert "row 1: field 'messages[1].content': empty text" in report.skipped[1]
    train, _, report = D.load_examples(cfg(path, on_bad_row="skip"), "sft")
    assert [e.row for e in train] == [3]
    assert report.skipped[2].endswith(
        "row 2: field 'messages': last message must be the assistant reply, got 'user'")


# ------------------------------------------------- malformed files (hostile-user probe)
def gz(path: Path) -> Path:
    """A gzipped copy of ``path`` beside it (name + .gz)."""
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


def error_of(path: Path, kind: str = "prompt", **kw) -> str:
    with pytest.raises(D.DataError) as err:
        D.load_examples(cfg(path, **kw), kind)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_invalid_json_line_names_its_row_not_a_byte_offset(tmp_path):
    # Row numbers count non-blank lines (as everywhere else: blank lines are not rows).
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n{"prompt": "d"}\n'
                    '{"prompt": "e"} trailing\n{"prompt": "f"}\n')
    for src in (path, gz(path)):
        assert error_of(src) == f"{src}: row 4: invalid JSON: Extra data (line 6, column 17)"
        train, _, report = D.load_examples(cfg(src, on_bad_row="skip"), "prompt")
        assert [e.row for e in train] == [0, 1, 2, 3, 5]
        assert report.skipped_summary() == (
            "1 bad row skipped: row 4 (invalid JSON: Extra data (line 6, column 17))")


def test_invalid_utf8_names_row_field_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n')
    assert error_of(path) == (f"{path}: row 1: field 'prompt': invalid UTF-8: byte 0xe9 "
                              "(line 3)")
    csv_path = tmp_path / "p.csv"
    csv_path.write_bytes(b'prompt,x\nok,1\n"multi\nline",\xff\n')
    assert error_of(csv_path) == (f"{csv_path}: row 1: field 'x': invalid UTF-8: byte 0xff "
                                  "(line 3)")


@pytest.mark.parametrize("text", ["", "\n\n   \n", "\ufeff"])
@pytest.mark.parametrize("name", ["e.jsonl", "e.json", "e.csv"])
def test_empty_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    for src in (path, gz(path)):
        assert error_of(src) == f"{src}: empty file (no rows)"


def test_missing_column_same_message_in_every_format(tmp_path):
    rows = [{"a": "1", "b": "2"}, {"a": "3", "b": "4"}]
    paths = [write_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "m.json",
             tmp_path / "m.csv", tmp_path / "m.parquet"]
    paths[1].write_text(json.dumps(rows))
    paths[2].write_text("a,b\n1,2\n3,4\n")
    _parquet(paths[3], rows)
    for path in [*paths, gz(paths[3])]:
        assert error_of(path) == (f"{path}: row 0: field 'prompt': missing; columns: a, b "
                                  "(cannot detect the data format; set data.format or "
                                  "data.fields)")
        assert error_of(path, format="prompt") == (
            f"{path}: row 0: field 'prompt': missing; columns: a, b")


def test_missing_reply_column_for_the_kind(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\nhello\n")
    assert error_of(path, "sft") == (f"{path}: row 0: field 'response': missing; columns: "
                                     "prompt (format 'prompt' cannot give sft examples)")
    assert error_of(FIX / "sft.jsonl", "preference").endswith(
        "row 0: field 'chosen': missing; columns: prompt, response (format 'sft' cannot give "
        "preference examples)")


def test_identical_replies_are_a_bad_row(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "  same\n"},
            {"prompt": "p", "chosen": "c", "rejected": "d"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert error_of(path, "preference") == f"{path}: row 1: field 'chosen': same as 'rejected'"
    train, _, report = D.load_examples(cfg(path, on_bad_row="skip"), "preference")
    assert [e.row for e in train] == [0, 2]
    assert report.skipped_summary() == (
        "1 bad row skipped: row 1 (field 'chosen': same as 'rejected')")
    sft, _, _ = D.load_examples(cfg(path), "sft")  # SFT on the chosen reply needs no contrast
    assert len(sft) == 3
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: q\n\nAssistant: x",
                                              "rejected": "\n\nHuman: q\n\nAssistant: x "}])
    assert error_of(hh, "preference").endswith("row 0: field 'chosen': same as 'rejected'")


def test_skipped_rows_summary_lists_the_first_rows(tmp_path):
    rows = [{"prompt": "ok"} if i % 3 == 0 else {"prompt": ""} for i in range(12)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "ok"}, {"prompt": 3}])
    train, held_out, report = D.load_examples(
        cfg(path, on_bad_row="skip", eval_split=str(eval_path)), "prompt")
    assert [e.row for e in train] == [0, 3, 6, 9] and [e.row for e in held_out] == [0]
    assert report.n_skipped == 9 and len(report.skipped) == D.MAX_REPORTED
    assert report.skipped_summary() == (
        "9 bad rows skipped: row 1 (field 'prompt': empty text), row 2 (field 'prompt': empty "
        "text), row 4 (field 'prompt': empty text), row 5 (field 'prompt': empty text), row 7 "
        "(field 'prompt': empty text), and 4 more")
    few = D.DataReport(source=str(path), format="prompt", total_rows=2)
    few.skip(D.DataError("x", str(eval_path), 1, "field 'prompt': expected a string, got int"))
    assert few.skipped_summary() == (
        f"1 bad row skipped: {eval_path} row 1 (field 'prompt': expected a string, got int)")
    assert D.DataReport(source="s", format="prompt", total_rows=1).skipped_summary() == ""


def test_tokenizer_skips_can_go_into_the_report(tok):
    train, _, report = D.load_examples(cfg("sft.jsonl"), "sft")
    items, skipped = D.tokenize_sft(tok, train, 50, 128, on_bad_row="skip",
                                    source=report.source, report=report)
    assert skipped == report.n_skipped == 3 and len(items) == 2
    assert report.skipped_summary().startswith(
        "3 bad rows skipped: row 2 (prompt is 52 tokens, over max_prompt_len=50), row 3 (")


def test_local_files_load_offline_without_datasets(tmp_path, monkeypatch):
    """No hub request, cache or telemetry: local files never go through `datasets` (or the
    hub client), whatever the environment says, and open no socket."""
    import socket

    rows = [{"prompt": "p", "response": "r"}]
    paths = [write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "a.json", tmp_path / "a.csv",
             tmp_path / "a.parquet"]
    paths[1].write_text(json.dumps(rows))
    paths[2].write_text("prompt,response\np,r\n")
    _parquet(paths[3], rows)
    for name in ("datasets", "huggingface_hub"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError

    def no_network(*args, **kwargs):
        raise AssertionError("network access while loading a local file")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for path in [*paths, *map(gz, paths)]:
        train, _, _ = D.load_examples(cfg(path), "sft")
        assert train == [D.SFTExample([user("p")], "r", 0)]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("d.jsonl.gz", b'{"prompt": "not gzip"}\n',
         "not a valid gzip file: Not a gzipped file (b'{\"')"),
        ("d.parquet", b"PAR1 but not parquet",
         "cannot read as parquet: Parquet magic bytes not found in footer. Either the file is "
         "corrupted or this is not a parquet file."),
        ("d.json", b"[1, 2]", "row 0: expected an object of columns ({\"prompt\": ...}), got int"),
        ("d.jsonl", b'"just a string"\n',
         "row 0: expected an object of columns ({\"prompt\": ...}), got str"),
        ("d.json", b'[{"prompt": "a"},\n {"prompt": }]',
         "row 1: invalid JSON: Expecting value (line 2, column 13)"),
        ("d.json", b'[{"prompt": "a"}] [', "invalid JSON: extra data after the array (line 1, "
                                           "column 19)"),
        ("d.csv", b"prompt,prompt\na,b\n", "duplicate column 'prompt' in the CSV header"),
        ("d.txt", b"prompt\n", "unsupported file type; expected a .jsonl, .json, .parquet or "
                               ".csv file, optionally .gz"),
    ],
)
def test_malformed_files_give_one_line(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    assert error_of(path) == f"{path}: {problem}"


def test_directory_and_wrong_nested_types(tmp_path):
    assert error_of(tmp_path) == (f"{tmp_path}: is a directory; expected a .jsonl, .json, "
                                  ".parquet or .csv file, optionally .gz")
    rows = [{"messages": [user("hi"), {"role": 7, "content": "x"}]},
            {"messages": [user("hi"), {"role": "assistant"}]},
            {"messages": "hi"},
            {"messages": [user("hi"), bot("yo")]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    _, _, report = D.load_examples(cfg(path, on_bad_row="skip"), "sft")
    assert [m.split(": ", 1)[1] for m in report.skipped] == [
        "row 0: field 'messages[1].role': expected a string, got int",
        "row 1: field 'messages[1].content': missing; keys: role",
        "row 2: field 'messages': expected a list of messages, got str",
    ]


def test_json_lines_in_a_json_file_bom_and_crlf(tmp_path):
    # What the datasets readers accepted keeps loading: JSON lines under a .json name, one
    # pretty-printed object, a byte-order mark and CRLF line ends (Excel's CSV).
    lines = tmp_path / "l.json"
    lines.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    one = tmp_path / "o.json"
    one.write_text('{\n  "prompt": "a"\n}\n')
    excel = tmp_path / "x.csv"
    excel.write_bytes("\ufeffprompt,n\r\ncafé,1\r\n\r\n\"two\r\nlines\",2\r\n".encode())
    assert [e.messages for e in D.load_examples(cfg(lines), "prompt")[0]] == [[user("a")],
                                                                              [user("b")]]
    assert D.load_examples(cfg(one), "prompt")[0] == [D.PromptExample([user("a")], 0)]
    rows = D.read_local(str(excel))
    assert rows == [{"prompt": "café", "n": "1"}, {"prompt": "two\r\nlines", "n": "2"}]


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


# ----------------------------------------------------------------------------- rendering
def test_render_with_chat_template(tok):
    msgs = [user("Hi")]
    assert D.render_prompt(tok, msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert D.render_response(tok, msgs, "Yo") == "Yo<|im_end|>\n"
    assert D.format_for_reward(tok, msgs, "Yo") == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n")


def test_render_without_chat_template_is_plain_hh_text():
    plain = make_tiny_tokenizer(chat_template=False)
    msgs = [user("Hi"), bot("Hello"), user("Bye?")]
    expected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye?\n\nAssistant:"
    assert D.render_prompt(plain, msgs) == expected
    assert D.render_response(plain, msgs, "Bye.") == " Bye.<|im_end|>"
    text = D.format_for_reward(plain, msgs[:1], "Hello")
    assert text == "\n\nHuman: Hi\n\nAssistant: Hello<|im_end|>"
    assert D.parse_hh(text.removesuffix("<|im_end|>")) == ([user("Hi")], "Hello")


def test_render_response_when_prompt_is_not_a_prefix():
    odd = make_tiny_tokenizer()
    # The generation prompt says "bot:" but a rendered reply says "assistant:".
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}"
    )
    with pytest.warns(UserWarning, match="not render the prompt as a prefix"):
        assert D.render_response(odd, [user("x")], "y") == "y<|im_end|>"


# ---------------------------------------------------------------------------- tokenising
def test_tokenize_sft_masks_the_prompt(tok):
    examples = [D.SFTExample([user("What?")], "Paris.", 7)]
    items, skipped = D.tokenize_sft(tok, examples, max_prompt_len=64, max_len=128)
    assert skipped == 0
    ids, labels = items[0]["input_ids"], items[0]["labels"]
    n_prompt = len(tok(D.render_prompt(tok, examples[0].messages),
                       add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert all(label != -100 for label in labels[n_prompt:])
    assert labels[n_prompt:] == ids[n_prompt:]
    response = tok.decode(ids[n_prompt:])
    assert response == "Paris.<|im_end|>\n" and tok.eos_token_id in ids[n_prompt:]
    assert tok.decode(ids) == D.format_for_reward(tok, examples[0].messages, "Paris.")
    assert tok.bos_token_id not in ids  # no special tokens added on top of the template


def test_tokenize_sft_truncates_the_response(tok):
    examples = [D.SFTExample([user("Q")], "x" * 100, 0)]
    items, _ = D.tokenize_sft(tok, examples, max_prompt_len=32, max_len=40)
    assert len(items[0]["input_ids"]) == 40 == len(items[0]["labels"])


def test_prompt_too_long(tok):
    train, _, _ = D.load_examples(cfg("sft.jsonl"), "sft")
    # Prompt lengths are 49, 39, 52, 57, 52 tokens (19 of them from the template).
    with pytest.raises(D.DataError) as err:
        D.tokenize_sft(tok, train, max_prompt_len=50, max_len=128, source="sft.jsonl")
    assert str(err.value) == "sft.jsonl: row 2: prompt is 52 tokens, over max_prompt_len=50"
    items, skipped = D.tokenize_sft(tok, train, 50, 128, on_bad_row="skip", source="sft.jsonl")
    # Replies are "Paris." and "7", each followed by "<|im_end|>\n" (2 tokens).
    assert skipped == 3 and [len(it["labels"]) for it in items] == [49 + 8, 39 + 3]


def test_tokenize_preference(tok):
    train, _, _ = D.load_examples(cfg("hh.jsonl"), "preference")
    items, skipped = D.tokenize_preference(tok, train, max_prompt_len=400, max_len=420)
    assert skipped == 0 and len(items) == 4
    for ex, item in zip(train, items, strict=True):
        prompt = tok(D.render_prompt(tok, ex.messages), add_special_tokens=False)["input_ids"]
        assert item["chosen_ids"][: len(prompt)] == prompt == item["rejected_ids"][: len(prompt)]
        assert len(item["chosen_ids"]) <= 420 and len(item["rejected_ids"]) <= 420
    assert tok.decode(items[0]["rejected_ids"]).endswith("Put it in the freezer.<|im_end|>\n")


def test_tokenize_prompts(tok):
    train, _, _ = D.load_examples(cfg("prompts.csv"), "prompt")
    # The template adds 19 tokens; "Explain, in one line, what a CPU does." has 38 characters.
    items, skipped = D.tokenize_prompts(tok, train, max_prompt_len=50, on_bad_row="skip")
    assert skipped == 1
    assert [it["row"] for it in items] == [0, 2, 3]
    text = "<|im_start|>user\n007<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(items[1]["input_ids"]) == text
    assert items[1]["messages"] == [user("007")]


# ----------------------------------------------------------------------- packing/collation
def test_pack_sft():
    items = [{"input_ids": [1] * n, "labels": [-100] + [2] * (n - 1)} for n in (4, 3, 5, 2)]
    packed = D.pack_sft(items, max_len=8)
    assert [len(p["input_ids"]) for p in packed] == [7, 7]
    assert packed[0]["labels"] == [-100, 2, 2, 2, -100, 2, 2]
    with pytest.raises(ValueError):
        D.pack_sft(items, max_len=4)


def test_collate_sft():
    items = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = D.collate_sft(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_collate_preference_chosen_then_rejected():
    items = [{"chosen_ids": [1, 2], "rejected_ids": [1, 3, 3]},
             {"chosen_ids": [4], "rejected_ids": [4, 5]}]
    batch = D.collate_preference(items, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 9], [4, 9, 9], [1, 3, 3], [4, 5, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]


def test_left_pad():
    ids, mask = D.left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError):
        D.left_pad([], pad_id=0)


def test_end_to_end_sft_batch(tok):
    train, _, _ = D.load_examples(cfg("chat.jsonl"), "sft")
    items, _ = D.tokenize_sft(tok, train, max_prompt_len=100, max_len=200)
    batch = D.collate_sft(items, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(map(len, (
        it["input_ids"] for it in items))))
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == tok.pad_token_id).all()
    assert (batch["labels"][pad] == -100).all()


def test_sft_from_preference_rows_uses_the_chosen_reply(tmp_path):
    from apactl.config import DataConfig
    from apactl.data import SFTExample, load_examples

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}\n' * 3)
    train, _, _ = load_examples(DataConfig(source=str(path)), "sft")
    assert train[0] == SFTExample([{"role": "user", "content": "Hi?"}], "Hello!", 0)


def test_system_message_is_prepended_once(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi"},
        {"prompt": [{"role": "system", "content": "be brief"}, user("yo")]},
    ])
    train, _, _ = D.load_examples(cfg(src, system=""), "prompt")
    assert train[0].messages == [{"role": "system", "content": ""}, user("hi")]
    assert train[1].messages[0] == {"role": "system", "content": "be brief"}  # kept, not doubled
    assert len(train[1].messages) == 2
    plain, _, _ = D.load_examples(cfg(src), "prompt")
    assert plain[0].messages == [user("hi")]  # None: the template's default applies


def test_empty_system_turn_round_trips_through_a_file(tmp_path):
    """What `label` writes with data.system="" (a prompt with an empty system turn) loads."""
    src = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": [{"role": "system", "content": ""}, user("hi")], "response": "ok"}])
    train, _, _ = D.load_examples(cfg(src), "sft")
    assert train[0].messages == [{"role": "system", "content": ""}, user("hi")]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": [user("")], "response": "ok"}])
    with pytest.raises(D.DataError, match="empty text"):
        D.load_examples(cfg(bad), "sft")
