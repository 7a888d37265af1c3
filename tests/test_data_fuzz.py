"""Table-driven fuzz of bad data through ``load_examples``: every case must give one clean
``DataError`` line naming the source file (and the row and field where one applies); a per-row
problem is also loaded with ``on_bad_row=skip``, which must drop exactly the bad row, keep the
good ones and name the dropped row in ``DataReport.summary()``.

Each case is a file whose suffix picks the format (.jsonl/.json/.csv/.parquet, optionally .gz);
its content is a list of rows written in that format, or raw text/bytes for broken files.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from apactl.config import DataConfig
from apactl.data import DataError, load_examples

DIR = object()  # content: make the source a directory
ABSENT = object()  # content: do not create the file


class Raw(bytes):
    """Content written as it is, even under a .gz name (other content is gzipped there)."""


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # sft, preference or prompt
    name: str  # file name; its suffix picks the format
    content: Any  # rows, str/bytes (gzipped for a .gz name), Raw bytes, DIR or ABSENT
    match: str  # regex searched in the message after "source: "
    row: int | None = None  # the row the message must name
    field_name: str | None = None  # the field the message must name
    kept: tuple[int, ...] | None = None  # rows kept under skip; None: not a per-row problem
    options: dict[str, Any] = field(default_factory=dict)  # more DataConfig fields


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


SFT = {"prompt": "p", "response": "r"}
PREF = {"prompt": "p", "chosen": "a", "rejected": "b"}
PROMPT = {"prompt": "p"}
CHAT = {"messages": [user("q"), bot("a")]}
HH = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
GOOD = {"sft": SFT, "preference": PREF, "prompt": PROMPT}
TABLE_FORMATS = ("p.jsonl", "p.json", "p.csv", "p.parquet")


def middle(kind: str, bad: Any, good: dict | None = None) -> list[Any]:
    """A good row, the bad row (row 1), a good row."""
    good = good or GOOD[kind]
    return [good, bad, good]


def per_row(cid: str, kind: str, bad: Any, match: str, field_name: str | None,
            names: tuple[str, ...], good: dict | None = None) -> list[Case]:
    """The same bad row 1 between good rows, in each of ``names``' formats."""
    return [Case(f"{cid}-{name}", kind, name, middle(kind, bad, good), match, 1, field_name,
                 (0, 2))
            for name in names]


MISSING_AB = r"missing; columns: a, b \(cannot detect the data format"
CASES: list[Case] = [
    # --------------------------------------------------------------- per-row: text fields
    *per_row("empty-response", "sft", {"prompt": "p", "response": ""}, "empty text",
             "response", (*TABLE_FORMATS, "p.csv.gz", "p.parquet.gz")),
    *per_row("blank-prompt", "sft", {"prompt": " \t ", "response": "r"}, "empty text", "prompt",
             ("p.jsonl", "p.csv")),
    *[c for space in ("\u00a0", "\u2003", "\u200b", "\u200b\u00a0\u200b")
      for c in per_row(f"invisible-prompt-{ord(space[0]):04x}-{len(space)}", "prompt",
                       {"prompt": space}, "^row 1: field 'prompt': empty text$", "prompt",
                       ("p.jsonl", "p.csv"))],
    *per_row("invisible-reply", "preference", {"prompt": "p", "chosen": "\u200b", "rejected": "b"},
             "empty text", "chosen", ("p.jsonl",)),
    *per_row("null-response", "sft", {"prompt": "p", "response": None},
             r"missing \(null\)", "response", ("p.jsonl", "p.json", "p.parquet")),
    *per_row("int-response", "sft", {"prompt": "p", "response": 42},
             "expected a string or a list of messages, got int|expected a string, got int",
             "response", ("p.jsonl", "p.json")),
    *per_row("same-replies", "preference", {"prompt": "p", "chosen": "x", "rejected": " x\n"},
             "same as 'rejected'", "chosen", (*TABLE_FORMATS, "p.parquet.gz", "p.jsonl.gz")),
    *per_row("row-lacks-rejected", "preference", {"prompt": "p", "chosen": "x"},
             "missing; columns: prompt, chosen$", "rejected", ("p.jsonl", "p.json")),
    *per_row("null-prompt", "prompt", {"prompt": None}, r"missing \(null\)", "prompt",
             ("p.jsonl", "p.parquet")),
    *per_row("empty-prompt", "prompt", {"prompt": ""}, "empty text", "prompt",
             ("p.csv", "p.csv.gz")),
    *per_row("dict-prompt", "prompt", {"prompt": {"text": "hi"}},
             "expected a string or a list of messages, got dict", "prompt", ("p.jsonl",)),
    *per_row("prompt-ends-with-reply", "prompt", {"prompt": [user("q"), bot("a")]},
             "the prompt ends with an assistant message", "prompt", ("p.jsonl",)),
    *per_row("chosen-list-ends-with-user", "preference",
             {"prompt": "p", "chosen": [user("x")], "rejected": "b"},
             "last message must be the assistant reply, got 'user'", "chosen", ("p.jsonl",)),
    # ------------------------------------------------------------- per-row: chat messages
    *per_row("bad-role", "sft", {"messages": [user("q"), {"role": "robot", "content": "a"}]},
             "unknown role 'robot'", "messages[1].role", ("p.jsonl", "p.parquet"), CHAT),
    *per_row("int-role", "sft", {"messages": [{"role": 3, "content": "q"}, bot("a")]},
             "expected a string, got int", "messages[0].role", ("p.jsonl",), CHAT),
    *per_row("messages-is-text", "sft", {"messages": "q"}, "expected a list of messages, got str",
             "messages", ("p.jsonl",), CHAT),
    *per_row("message-not-mapping", "sft", {"messages": ["q", bot("a")]},
             r"expected a \{role, content\} mapping, got str", "messages[0]", ("p.jsonl",), CHAT),
    *per_row("message-lacks-content", "sft", {"messages": [user("q"), {"role": "assistant"}]},
             "missing; keys: role", "messages[1].content", ("p.jsonl",), CHAT),
    *per_row("no-messages", "sft", {"messages": []}, "empty list of messages", "messages",
             ("p.jsonl",), CHAT),
    *per_row("reply-only", "sft", {"messages": [bot("a")]}, "no prompt message before",
             "messages", ("p.jsonl",), CHAT),
    *per_row("null-content", "prompt", {"messages": [user(None)]}, r"missing \(null\)",
             "messages[0].content", ("p.jsonl", "p.parquet"), {"messages": [user("q")]}),
    # ------------------------------------------------------------------ per-row: HH text
    *per_row("hh-dialogues-differ", "preference",
             {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: X\n\nAssistant: b"},
             "the dialogue before the final reply differs", "rejected", ("p.jsonl",), HH),
    *per_row("hh-no-assistant", "preference",
             {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q"},
             "expected Human first and an Assistant turn last", "rejected", ("p.jsonl",), HH),
    # ------------------------------------------------------- per-row: unreadable rows
    *per_row("row-is-array", "prompt", [1, 2], r"expected an object of columns .*got list", None,
             ("p.jsonl", "p.json")),
    *per_row("row-is-number", "sft", 7, r"expected an object of columns .*got int", None,
             ("p.jsonl", "p.json")),
    Case("invalid-json-line-after-blank", "prompt", "p.jsonl",
         '{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c" oops}\n{"prompt": "d"}\n',
         r"invalid JSON: Expecting ',' delimiter \(line 4, column 16\)", 2, None, (0, 1, 3)),
    Case("truncated-last-line-gz", "sft", "p.jsonl.gz",
         '{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp',
         r"invalid JSON: Unterminated string .*\(line 2, column 17\)", 1, None, (0,)),
    Case("deeply-nested-line", "prompt", "p.jsonl",
         '{"prompt": "a"}\n' + "[" * 100_000 + "]" * 100_000 + '\n{"prompt": "b"}\n',
         r"invalid JSON: nested too deeply \(line 2\)", 1, None, (0, 2)),
    Case("too-many-digits", "prompt", "p.jsonl",
         '{"prompt": "a"}\n{"prompt": ' + "9" * 5000 + '}\n{"prompt": "b"}\n',
         r"invalid JSON: .*\(line 2\)", 1, None, (0, 2)),
    Case("invalid-utf8-jsonl", "sft", "p.jsonl",
         b'{"prompt": "a", "response": "b"}\n{"prompt": "a\xc3(", "response": "b"}\n'
         b'{"prompt": "c", "response": "d"}\n',
         r"invalid UTF-8: byte 0xc3 \(line 2\)", 1, "prompt", (0, 2)),
    Case("invalid-utf8-outside-string", "prompt", "p.jsonl",
         b'{"prompt": "a"}\n{"prompt": \xff}\n{"prompt": "b"}\n',
         r"invalid UTF-8: byte 0xff \(line 2, column 12\)", 1, None, (0, 2)),
    Case("invalid-utf8-nested", "sft", "p.jsonl.gz",
         b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
         b'"content": "a"}]}\n{"messages": [{"role": "user", "content": "q\xfe"}, '
         b'{"role": "assistant", "content": "a"}]}\n',
         r"invalid UTF-8: byte 0xfe", 1, "messages[0].content", (0,)),
    Case("invalid-utf8-csv", "prompt", "p.csv", b"prompt\nok\nbad \x80 byte\nfine\n",
         r"invalid UTF-8: byte 0x80 \(line 3\)", 1, "prompt", (0, 2)),
    Case("invalid-utf8-json-array", "prompt", "p.json",
         b'[{"prompt": "a"},\n {"prompt": "\xe9"},\n {"prompt": "b"}]',
         r"invalid UTF-8: byte 0xe9 \(line 2, column 2\)", 1, "prompt", (0, 2)),
    Case("lone-surrogate-escape", "prompt", "p.jsonl",
         '{"prompt": "a"}\n{"prompt": "x\\ud800y"}\n{"prompt": "b"}\n',
         r"invalid Unicode: lone surrogate \\ud800 \(line 2\)", 1, "prompt", (0, 2)),
    Case("csv-too-many-cells", "sft", "p.csv", "prompt,response\np,r\np,r,extra\np,r\n",
         r"3 cells, but the header has 2 columns \(line 3\)", 1, None, (0, 2)),
    Case("csv-too-few-cells", "sft", "p.csv", "prompt,response\np,r\np\np,r\n",
         r"1 cells, but the header has 2 columns \(line 3\)", 1, None, (0, 2)),
    # -------------------------------------------------- file-level: missing columns
    *[Case(f"missing-column-{name}", "prompt", name, [{"a": "1", "b": "2"}] * 2, MISSING_AB, 0,
           "prompt") for name in (*TABLE_FORMATS, "p.parquet.gz")],
    Case("sft-from-prompt-only-csv", "sft", "p.csv", "prompt\nq\n",
         r"missing; columns: prompt \(format 'prompt' cannot give sft examples\)", 0, "response"),
    Case("preference-from-sft", "preference", "p.parquet", [SFT, SFT],
         r"missing; columns: prompt, response \(format 'sft'", 0, "chosen"),
    Case("hh-lacks-rejected", "preference", "p.jsonl", [{"chosen": HH["chosen"]}],
         r"missing; columns: chosen \(cannot detect", 0, "rejected"),
    Case("explicit-format-column-absent", "sft", "p.csv", "question,answer\nq,a\n",
         r"missing; columns: question, answer$", 0, "prompt", options={"format": "sft"}),
    # --------------------------------------------------------- file-level: empty files
    *[Case(f"empty-{name}", "prompt", name, "", r"^empty file \(no rows\)$")
      for name in ("p.jsonl", "p.json", "p.csv", "p.jsonl.gz")],
    Case("blank-lines-only", "sft", "p.jsonl", "\n \n\t\n\r\n", r"^empty file \(no rows\)$"),
    Case("bom-only-csv", "prompt", "p.csv", "\ufeff", r"^empty file \(no rows\)$"),
    Case("empty-array", "prompt", "p.json", "[ ]", r"^no rows \(an empty JSON array\)$"),
    Case("header-only-csv", "prompt", "p.csv", "prompt\n", r"^no rows \(only a header line\)$"),
    Case("skip-past-the-end", "prompt", "p.jsonl", [PROMPT], r"no rows after skip_rows=5$",
         options={"skip_rows": 5}),
    Case("every-row-bad", "prompt", "p.jsonl", [{"prompt": ""}, {"prompt": ""}],
         r"row 0: field 'prompt': empty text", 0, "prompt"),
    Case("no-row-is-an-object", "prompt", "p.jsonl", "1\n2\n",
         r"expected an object of columns .*got int", 0),
    # ---------------------------------------------------- file-level: broken containers
    Case("not-gzip", "prompt", "p.jsonl.gz", Raw(b'{"prompt": "a"}\n'),
         r"^not a valid gzip file: Not a gzipped file"),
    Case("truncated-gzip", "prompt", "p.csv.gz",
         Raw(gzip.compress(b"prompt\n" + b"x\n" * 500)[:-9]),
         r"^corrupt gzip file: truncated \(the compressed data stops before its end\)$"),
    Case("crc-damaged-gzip", "prompt", "p.jsonl.gz",
         Raw(gzip.compress(b'{"prompt": "a"}\n' * 50)[:30]
             + bytes([gzip.compress(b'{"prompt": "a"}\n' * 50)[30] ^ 0xFF])
             + gzip.compress(b'{"prompt": "a"}\n' * 50)[31:]),
         r"^corrupt gzip file: "),
    Case("not-parquet", "prompt", "p.parquet", b"prompt\nhello\n",
         r"^cannot read as parquet: Parquet magic bytes not found"),
    Case("gz-of-not-parquet", "sft", "p.parquet.gz", b"hello",
         r"^cannot read as parquet: "),
    Case("json-syntax-mid-array", "prompt", "p.json", '[{"prompt": "a"}, {"prompt": "b",}]',
         r"invalid JSON: Expecting property name .*\(line 1, column 34\)", 1),
    Case("json-array-unterminated", "prompt", "p.json", '[{"prompt": "a"}, {"prompt": "b"}',
         r"invalid JSON: expected ',' or ']' after the element", 1),
    Case("json-extra-after-array", "prompt", "p.json", '[{"prompt": "a"}]\n{"prompt": "b"}',
         r"invalid JSON: extra data after the array \(line 2, column 1\)"),
    Case("csv-unclosed-quote", "sft", "p.csv", 'prompt,response\np,r\n"p,r\np,r\n',
         r"invalid CSV: unexpected end of data \(line 3\)", 1),
    Case("csv-text-after-quote", "prompt", "p.csv.gz", 'prompt\nok\n"a"b\n',
         r"invalid CSV: ',' expected after '\"' \(line 3\)", 1),
    Case("csv-duplicate-header", "prompt", "p.csv", "prompt,x,prompt\na,b,c\n",
         r"duplicate column 'prompt' in the CSV header"),
    Case("source-is-directory", "sft", "data.jsonl", DIR, r"^is a directory; expected"),
    Case("source-missing", "sft", "nope.jsonl", ABSENT, r"^file not found$"),
    Case("unsupported-suffix", "prompt", "p.tsv", "prompt\nq\n", r"^unsupported file type"),
    Case("newline-in-column-name", "prompt", "p.csv", '"a\nb",c\n1,2\n',
         r"missing; columns: a\\nb, c", 0, "prompt"),
]


# ------------------------------------------------------------------------------- writing
def encode(name: str, rows: list[Any]) -> bytes:
    """``rows`` in the format of ``name`` (without .gz)."""
    if name.endswith(".jsonl"):
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if name.endswith(".json"):
        return json.dumps(rows).encode()
    if name.endswith(".csv"):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist keeps row 0's only
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), sink)
    return sink.getvalue().to_pybytes()


def write(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / case.name
    if case.content is DIR:
        path.mkdir()
        return path
    if case.content is ABSENT:
        return path
    content = case.content
    plain = case.name.removesuffix(".gz")
    data = content.encode() if isinstance(content, str) else content
    if isinstance(content, list):
        data = encode(plain, content)
    if case.name.endswith(".gz") and not isinstance(content, Raw):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------- tests
def test_the_table_is_big_and_wide():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == {"sft", "preference", "prompt"}
    suffixes = {c.name.split(".", 1)[1] for c in CASES}
    assert {"jsonl", "json", "csv", "parquet", "jsonl.gz", "csv.gz", "parquet.gz"} <= suffixes


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data_gives_one_line_naming_source_row_field(tmp_path, case):
    path = write(tmp_path, case)
    with pytest.raises(DataError) as err:
        load_examples(DataConfig(source=str(path), **case.options), case.kind)
    message = str(err.value)
    assert "\n" not in message and "\r" not in message and "Traceback" not in message
    assert message.startswith(f"{path}: "), message
    rest = message[len(f"{path}: "):]
    assert re.search(case.match, rest), message
    if case.row is not None:
        assert rest.startswith(f"row {case.row}: "), message
        assert err.value.row == case.row
    if case.field_name is not None:
        assert f"field '{case.field_name}': " in rest, message
    message.encode("utf-8")  # printable: no lone surrogate leaks into the message


SKIPPABLE = [c for c in CASES if c.kept is not None]


@pytest.mark.parametrize("case", SKIPPABLE, ids=[c.id for c in SKIPPABLE])
def test_skip_drops_only_the_bad_row_and_names_it(tmp_path, case):
    path = write(tmp_path, case)
    # One bad row of 2-4 is over the default limit on what skip may drop (10%): raised here.
    config = DataConfig(source=str(path), on_bad_row="skip", max_bad_fraction=0.5,
                        **case.options)
    with pytest.raises(DataError) as err:  # the same message the error mode gives
        load_examples(config.model_copy(update={"on_bad_row": "error"}), case.kind)
    train, held_out, report = load_examples(config, case.kind)
    assert tuple(e.row for e in train + held_out) == case.kept
    assert report.n_skipped == 1 and report.skipped == [str(err.value)]
    summary = report.summary()
    assert "\n" not in summary and f"1 bad row skipped: row {case.row} (" in summary, summary
    if case.field_name is not None:
        assert f"row {case.row} (field '{case.field_name}': " in summary, summary


# ------------------------------------------------- format by agreement (issue 20, item 2)
def mixed_rows() -> list[dict]:
    """40 sft rows with 8 preference rows among them (source rows 20-27)."""
    sft = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    pref = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(8)]
    return sft[:20] + pref + sft[20:]


MIXED_FILES = ("p.jsonl", "p.csv", "p.parquet")


@pytest.mark.parametrize("name", MIXED_FILES)
def test_a_few_rows_of_another_shape_do_not_flip_the_format(tmp_path, name):
    # Before: the union of the columns made the file 'preference'; error mode blamed valid row
    # 0, skip mode dropped the 40 sft rows and trained on the other 8 (exit 0).
    path = write(tmp_path, Case("mixed", "sft", name, mixed_rows(), ""))
    with pytest.raises(DataError) as err:  # error mode: the first row that disagrees
        load_examples(DataConfig(source=str(path)), "sft")
    assert str(err.value).startswith(f"{path}: row 20: field 'response': "), err.value
    with pytest.raises(DataError) as err:  # skip mode: 8 of 48 is over the 10% limit
        load_examples(DataConfig(source=str(path), on_bad_row="skip"), "sft")
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"{path}: 8 of 48 rows are bad (17%), more than data.max_bad_fraction=0.1 that "
        "on_bad_row=skip may drop (format 'sft' (detected: 40 of 48 rows; row 20 looks "
        "'preference'); first: row 20 (field 'response': "), message
    # A higher limit keeps the majority: the 40 sft rows, never the 8 others.
    train, _, report = load_examples(
        DataConfig(source=str(path), on_bad_row="skip", max_bad_fraction=0.2), "sft")
    assert [e.row for e in train] == [*range(20), *range(28, 48)]
    assert report.format == "sft" and report.n_skipped == 8
    assert report.format_note() == ("format 'sft' (detected: 40 of 48 rows; row 20 looks "
                                    "'preference')")


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_a_majority_format_that_cannot_give_the_kind_is_one_line(tmp_path, mode):
    path = write(tmp_path, Case("mixed", "preference", "p.jsonl", mixed_rows(), ""))
    with pytest.raises(DataError) as err:
        load_examples(DataConfig(source=str(path), on_bad_row=mode), "preference")
    assert str(err.value) == (
        f"{path}: row 0: field 'chosen': missing; columns: prompt, response (format 'sft' "
        "(40 of 48 rows) cannot give preference examples)")


def test_the_format_line_says_how_it_was_decided(tmp_path):
    from apactl.workflows.common import data_summary

    rows = [{"prompt": f"p{i}", "response": "r"} for i in range(5)]
    path = write(tmp_path, Case("sft", "sft", "p.jsonl", rows, ""))
    _, _, report = load_examples(DataConfig(source=str(path)), "sft")
    assert data_summary(report, 5, 0) == (
        f"data: {path} (format 'sft' (detected: 5 of 5 rows)): 5 train / 0 held-out examples")
    _, _, report = load_examples(DataConfig(source=str(path), format="sft"), "sft")
    assert data_summary(report, 5, 0) == (
        f"data: {path} (format 'sft'): 5 train / 0 held-out examples")


def test_duplicated_rows_are_counted_and_held_out_copies_warned(tmp_path):
    from apactl.workflows.common import data_summary

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(8)]
    rows += [rows[1], rows[2], rows[1]]  # training rows 8-10 repeat rows 1, 2, 1
    rows += [rows[0], {"prompt": "new", "response": "x"}, rows[3]]  # held out: 2 copies of 3
    path = write(tmp_path, Case("dups", "sft", "p.jsonl", rows, ""))
    train, held, report = load_examples(DataConfig(source=str(path), eval_rows=3), "sft")
    assert (len(train), len(held)) == (11, 3)  # reported, not dropped
    assert (report.n_duplicates, report.n_eval_copies) == (3, 2)
    lines = data_summary(report, 11, 3).splitlines()
    assert lines[0].endswith("; 3 duplicated training rows (kept)"), lines
    assert lines[1] == ("[yellow]warning:[/] 2 of 3 held-out rows copy a training row: "
                        "held-out metrics overstate how well the model generalises"), lines
    _, _, clean = load_examples(DataConfig(source=str(path), max_rows=8), "sft")
    assert (clean.n_duplicates, clean.n_eval_copies) == (0, 0)
    assert "\n" not in data_summary(clean, 8, 0)
    assert "duplicated training" not in data_summary(clean, 8, 0)
