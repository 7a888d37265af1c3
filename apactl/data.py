"""The data layer: rows -> typed examples -> rendered text -> token ids -> padded batches.

Pipeline::

    load_rows      local file (.jsonl/.json/.parquet/.csv, optionally .gz) or hub dataset
    load_examples  detect the shape, validate every row, split train/eval
                   -> SFTExample | PreferenceExample | PromptExample (each keeps its source row)
    render_*       chat template (or plain "\\n\\nHuman: ... \\n\\nAssistant:" text)
    tokenize_*     token id lists; prompts over max_prompt_len are bad rows
    pack_sft / collate_* / left_pad   torch batches

Every user-facing problem is a ``DataError`` with a one-line message naming the source, the
0-based row in source order and the field. Heavy imports (datasets, torch) happen inside the
functions that need them so importing this module stays cheap.
"""

from __future__ import annotations

import csv
import gzip
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from apactl.config import DataConfig, FieldMap, looks_local, resolve_source

if TYPE_CHECKING:
    import torch

Kind = Literal["sft", "preference", "prompt"]
Messages = list[dict[str, str]]

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) ignore
MAX_REPORTED = 5  # skip messages kept in DataReport.skipped
ROLES = ("system", "user", "assistant")
# Which row shapes can feed which kind of example.
KIND_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("sft", "chat", "preference", "hh"),  # preference rows: SFT on the chosen reply
    "preference": ("preference", "hh"),
    "prompt": ("prompt", "sft", "chat", "preference", "hh"),
}


class DataError(Exception):
    """A user error in the data; one line: ``source: row N: field 'f': problem``."""


def _error(source: str, row: int | None, name: str | None, problem: str) -> DataError:
    parts = [source]
    if row is not None:
        parts.append(f"row {row}")
    if name is not None:
        parts.append(f"field '{name}'")
    return DataError(": ".join([*parts, problem]))


class _BadField(Exception):
    """Raised by the row parsers, which know the field but not the source or row number."""

    def __init__(self, name: str, problem: str):
        super().__init__(problem)
        self.name, self.problem = name, problem


# ---------------------------------------------------------------------------------- examples
@dataclass
class SFTExample:
    messages: Messages  # prompt turns [{"role", "content"}, ...], not ending with the assistant
    response: str  # the final assistant reply
    row: int  # 0-based row in the source


@dataclass
class PreferenceExample:
    messages: Messages
    chosen: str
    rejected: str
    row: int


@dataclass
class PromptExample:
    messages: Messages
    row: int


Example = SFTExample | PreferenceExample | PromptExample


@dataclass
class DataReport:
    """What load_examples read: counts refer to source rows (after max_rows)."""

    source: str
    format: str
    total_rows: int  # train + eval rows read, including skipped ones
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # the first MAX_REPORTED skip messages
    n_train: int = 0
    n_eval: int = 0

    def skip(self, message: str) -> None:
        self.n_skipped += 1
        if len(self.skipped) < MAX_REPORTED:
            self.skipped.append(message)

    def summary(self) -> str:
        text = (f"{self.source} ({self.format}): {self.total_rows} rows, {self.n_train} train, "
                f"{self.n_eval} eval")
        return text + (f", {self.n_skipped} skipped" if self.n_skipped else "")


# ----------------------------------------------------------------------------------- loading
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _root_message(exc: BaseException) -> str:
    """First line of the innermost cause: datasets wraps parse errors in generic ones."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_rows(cfg: DataConfig, split: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Raw rows in source order and a display name for messages.

    A local file is a single split, so ``split`` only applies to hub datasets.
    """
    _quiet_datasets()
    if looks_local(cfg.source):
        return read_local(resolve_source(cfg.source)), cfg.source
    import datasets

    split = split or cfg.split
    name = _hub_name(cfg, split)
    try:
        ds = datasets.load_dataset(cfg.source, cfg.subset, data_dir=cfg.data_dir, split=split)
    except Exception as exc:  # hub/network/config errors carry long messages; keep one line
        raise DataError(f"{name}: cannot load: {_root_message(exc)}") from exc
    return ds.to_list(), name


def _hub_name(cfg: DataConfig, split: str) -> str:
    """``owner/name:subset/data_dir[split]``, with the optional parts left out."""
    name = cfg.source + (f":{cfg.subset}" if cfg.subset else "")
    return name + (f"/{cfg.data_dir}" if cfg.data_dir else "") + f"[{split}]"


def read_local(ref: str) -> list[dict[str, Any]]:
    """Rows of one local .jsonl/.json/.parquet/.csv file (optionally .gz), in file order."""
    path = Path(ref).expanduser()
    if not path.is_file():
        raise DataError(f"{ref}: file not found")
    name = path.name.lower()
    gz = name.endswith(".gz")
    suffix = Path(name.removesuffix(".gz")).suffix
    if suffix not in _BUILDERS:
        raise DataError(f"{ref}: unsupported file type; expected .jsonl, .json, .parquet or "
                        ".csv, optionally .gz")
    try:
        if suffix == ".parquet" and gz:
            return _read_gz_parquet(path)
        return _load_file(_BUILDERS[suffix], path)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{ref}: cannot read as {suffix[1:]}: {_root_message(exc)}") from exc


def _load_file(builder: str, path: Path, cache_dir: str | None = None) -> list[dict[str, Any]]:
    # json and csv readers decompress .gz themselves; one data file keeps the file's row order.
    import datasets

    kwargs: dict[str, Any] = {"cache_dir": cache_dir}
    if builder == "csv":
        kwargs.update(_csv_options(path))
    ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    return ds.to_list()


def _csv_options(path: Path) -> dict[str, Any]:
    """CSV cells are text: read every column as a string ("007" stays "007", "NA" stays "NA";
    an empty cell becomes "" and is reported as empty text)."""
    import datasets

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: empty CSV file (no header row)")
    features = datasets.Features({c: datasets.Value("string") for c in header})
    return {"features": features, "keep_default_na": False}


def _read_gz_parquet(path: Path) -> list[dict[str, Any]]:
    # The parquet reader cannot stream through gzip: decompress to a scratch copy (and cache
    # there too, so throwaway paths do not pile up in the user's datasets cache).
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / path.name.removesuffix(".gz")
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return _load_file("parquet", plain, cache_dir=str(Path(tmp) / "cache"))


# ------------------------------------------------------------------------------ row parsing
def _text(value: Any, name: str) -> str:
    if value is None:
        raise _BadField(name, "missing")
    if not isinstance(value, str):
        raise _BadField(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadField(name, "empty text")
    return value


def _messages(value: Any, name: str) -> Messages:
    """A non-empty list of {role, content} mappings, copied to plain {role, content} dicts."""
    if value is None:
        raise _BadField(name, "missing")
    if not isinstance(value, list):
        raise _BadField(name, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _BadField(name, "empty list of messages")
    out = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise _BadField(where, f"expected a {{role, content}} mapping, got "
                                   f"{type(msg).__name__}")
        role = _text(msg.get("role"), f"{where}.role")
        if role not in ROLES:
            raise _BadField(f"{where}.role", f"unknown role {role!r}; expected one of "
                                             f"{', '.join(ROLES)}")
        content = msg.get("content")
        if not (role == "system" and content == ""):  # an empty system turn is meaningful
            content = _text(content, f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _prompt(row: dict[str, Any], name: str) -> Messages:
    """A prompt column: a plain string (one user turn) or a list of messages."""
    value = row.get(name)
    if isinstance(value, list):
        msgs = _messages(value, name)
        if msgs[-1]["role"] == "assistant":
            raise _BadField(name, "the prompt ends with an assistant message")
        return msgs
    return [{"role": "user", "content": _text(value, name)}]


def _reply(row: dict[str, Any], name: str) -> str:
    """A reply column: a string, or a messages list whose last message is the reply."""
    value = row.get(name)
    if not isinstance(value, list):
        return _text(value, name)
    last = _messages(value, name)[-1]
    if last["role"] != "assistant":
        raise _BadField(name, f"last message must be the assistant reply, got {last['role']!r}")
    return last["content"]


def _chat(row: dict[str, Any], name: str) -> tuple[Messages, str]:
    msgs = _messages(row.get(name), name)
    if msgs[-1]["role"] != "assistant":
        raise _BadField(name, f"last message must be the assistant reply, got "
                              f"{msgs[-1]['role']!r}")
    if len(msgs) < 2:
        raise _BadField(name, "no prompt message before the assistant reply")
    return msgs[:-1], msgs[-1]["content"]


_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh(text: str) -> tuple[Messages, str]:
    """Split an HH-RLHF transcript into (prompt messages, final assistant reply).

    ``"\\n\\nHuman: q1\\n\\nAssistant: a1\\n\\nHuman: q2\\n\\nAssistant: a2"`` ->
    ``([user q1, assistant a1, user q2], "a2")``. Consecutive turns of one speaker (they occur
    in the real data) are merged, because most chat templates require alternating roles.
    Raises ValueError on a malformed transcript.
    """
    text = "\n\n" + text.lstrip()  # some copies drop the leading blank line
    parts = re.split(r"\n\n(Human|Assistant):", text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("expected a transcript of '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns")
    turns: Messages = []
    n_turns = len(parts) // 2
    for i, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2], strict=True)):
        role, content = _HH_ROLES[speaker], content.strip()
        if not content and i < n_turns - 1:  # an empty final reply gets its own message
            raise ValueError(f"turn {i} ({speaker}) is empty")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content}".strip()
        else:
            turns.append({"role": role, "content": content})
    if turns[0]["role"] != "user" or turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise ValueError("expected Human first and an Assistant turn last")
    if not turns[-1]["content"]:
        raise ValueError("empty final assistant reply")
    return turns[:-1], turns[-1]["content"]


def _hh(row: dict[str, Any], name: str) -> tuple[Messages, str]:
    try:
        return parse_hh(_text(row.get(name), name))
    except ValueError as exc:
        raise _BadField(name, str(exc)) from None


def _hh_pair(row: dict[str, Any], f: FieldMap) -> tuple[Messages, str, str]:
    prompt, chosen = _hh(row, f.chosen)
    other, rejected = _hh(row, f.rejected)
    if other != prompt:
        raise _BadField(f.rejected, f"the dialogue before the final reply differs from "
                                    f"'{f.chosen}'")
    return prompt, chosen, rejected


def _parse_row(row: dict[str, Any], fmt: str, kind: Kind, f: FieldMap, i: int) -> Example:
    """One raw row -> the example for ``kind``; raises _BadField."""
    if kind == "prompt":
        return PromptExample(_prompt_only(row, fmt, f), i)
    if fmt == "sft":
        return SFTExample(_prompt(row, f.prompt), _text(row.get(f.response), f.response), i)
    if fmt == "chat":
        return SFTExample(*_chat(row, f.messages), i)
    if fmt == "hh":
        pair = PreferenceExample(*_hh_pair(row, f), i)
    else:
        prompt = _prompt(row, f.prompt)
        pair = PreferenceExample(prompt, _reply(row, f.chosen), _reply(row, f.rejected), i)
    return SFTExample(pair.messages, pair.chosen, i) if kind == "sft" else pair


def _prompt_only(row: dict[str, Any], fmt: str, f: FieldMap) -> Messages:
    """The prompt of any shape (held-out SFT or HH rows can feed RL); replies are not checked."""
    if fmt == "hh":
        return _hh(row, f.chosen)[0]
    if fmt != "chat":
        return _prompt(row, f.prompt)
    msgs = _messages(row.get(f.messages), f.messages)
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs:
        raise _BadField(f.messages, "no prompt message before the assistant reply")
    return msgs


# ------------------------------------------------------------------------ format & examples
def _looks_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def detect_format(row: dict[str, Any], fields: FieldMap, source: str) -> str:
    """The row shape from the (remapped) column names of a row; HH is recognised by its text."""
    keys = set(row)
    if fields.chosen in keys and fields.rejected in keys:
        if fields.prompt in keys:
            return "preference"
        if _looks_hh(row[fields.chosen]):
            return "hh"
    elif fields.messages in keys:
        return "chat"
    elif fields.prompt in keys:
        return "sft" if fields.response in keys else "prompt"
    raise DataError(f"{source}: cannot detect the data format from columns {sorted(keys)}; "
                    "set data.format or data.fields")


def _resolve_format(cfg: DataConfig, first: dict[str, Any], source: str, kind: Kind) -> str:
    fmt = detect_format(first, cfg.fields, source) if cfg.format == "auto" else cfg.format
    if fmt not in KIND_FORMATS[kind]:
        raise DataError(f"{source}: format '{fmt}' cannot give {kind} examples; expected "
                        f"{' or '.join(KIND_FORMATS[kind])} data")
    return fmt


def _parse_rows(rows: list[dict[str, Any]], start: int, fmt: str, kind: Kind, cfg: DataConfig,
                source: str, report: DataReport) -> list[Example]:
    """Parse rows[i] as source row start+i; bad rows raise or are counted in ``report``."""
    out = []
    for i, row in enumerate(rows, start):
        try:
            out.append(_parse_row(row, fmt, kind, cfg.fields, i))
        except _BadField as bad:
            err = _error(source, i, bad.name, bad.problem)
            if cfg.on_bad_row == "error":
                raise err from None
            report.skip(str(err))
    return out


def _n_held_out(cfg: DataConfig, n: int, source: str) -> int:
    k = cfg.eval_rows or (max(1, round(n * cfg.eval_fraction)) if cfg.eval_fraction else 0)
    if k >= n:
        raise DataError(f"{source}: holding out {k} of {n} rows for eval leaves none for training")
    return k


def _load_eval_split(cfg: DataConfig) -> tuple[list[dict[str, Any]], str]:
    """A hub eval split is a split name; a local source has no splits, so it must be a file."""
    assert cfg.eval_split is not None
    if looks_local(cfg.source):
        return read_local(resolve_source(cfg.eval_split)), cfg.eval_split
    return load_rows(cfg, split=cfg.eval_split)


def load_examples(cfg: DataConfig, kind: Kind) -> tuple[list[Example], list[Example], DataReport]:
    """Load, parse, validate and split into (train, eval, report); eval may be empty.

    ``max_rows`` keeps the first N rows (of the eval split too). ``eval_rows``/``eval_fraction``
    hold out the LAST source rows, without shuffling, so the held-out set is a fixed set of file
    rows (bad rows among them are skipped, so n_eval can be smaller than eval_rows).
    """
    rows, source = load_rows(cfg)
    skip = cfg.skip_rows  # row numbers in messages stay source row numbers
    rows = rows[skip:][: cfg.max_rows]
    if not rows:
        raise DataError(f"{source}: no rows")
    fmt = _resolve_format(cfg, rows[0], source, kind)
    report = DataReport(source=source, format=fmt, total_rows=len(rows))
    if cfg.eval_split is not None:
        eval_rows, eval_source = _load_eval_split(cfg)
        eval_rows = eval_rows[: cfg.max_rows]
        # A separate file may have another shape (e.g. prompts to evaluate an SFT run on).
        eval_fmt = _resolve_format(cfg, eval_rows[0], eval_source, kind) if eval_rows else fmt
        train = _parse_rows(rows, skip, fmt, kind, cfg, source, report)
        held_out = _parse_rows(eval_rows, 0, eval_fmt, kind, cfg, eval_source, report)
        report.total_rows += len(eval_rows)
    else:
        cut = len(rows) - _n_held_out(cfg, len(rows), source)
        train = _parse_rows(rows[:cut], skip, fmt, kind, cfg, source, report)
        held_out = _parse_rows(rows[cut:], skip + cut, fmt, kind, cfg, source, report)
    if cfg.system is not None:
        train, held_out = _with_system(train, cfg.system), _with_system(held_out, cfg.system)
    if not train:
        raise DataError(f"{source}: no valid training rows ({report.n_skipped} skipped, first: "
                        f"{report.skipped[0] if report.skipped else '-'})")
    report.n_train, report.n_eval = len(train), len(held_out)
    return train, held_out, report


def _with_system(examples: list[Example], system: str) -> list[Example]:
    """Prepend ``{"role": "system", "content": system}`` to prompts without a system turn."""
    return [ex if ex.messages and ex.messages[0].get("role") == "system"
            else replace(ex, messages=[{"role": "system", "content": system}, *ex.messages])
            for ex in examples]


# --------------------------------------------------------------------------------- rendering
def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """The text a model continues from: chat template with the generation prompt, or plain
    ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:"`` (system text goes first)."""
    if _has_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    plain = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "system": ""}
    return "".join(plain[m["role"]] + m["content"] for m in messages) + "\n\nAssistant:"


def render_response(tokenizer: Any, messages: Messages, response: str) -> str:
    """The text that follows render_prompt for this reply, end-of-turn marker included (so a
    model learns to stop)."""
    if not _has_template(tokenizer):
        return " " + response + (tokenizer.eos_token or "")
    prompt = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False,
        add_generation_prompt=False,
    )
    if full.startswith(prompt):
        return full[len(prompt):]
    # Some templates rewrite earlier turns (e.g. strip reasoning) or drop the generation prompt,
    # so the prompt is not a prefix: fall back to what generation is expected to produce.
    warnings.warn("the chat template does not render the prompt as a prefix of prompt+reply; "
                  "training on reply + eos_token instead", stacklevel=2)
    return response + (tokenizer.eos_token or "")


def format_for_reward(tokenizer: Any, messages: Messages, response: str) -> str:
    """The exact text a reward model scores (in RM training and when scoring samples); each
    model tokenises it with its own tokenizer."""
    return render_prompt(tokenizer, messages) + render_response(tokenizer, messages, response)


# ------------------------------------------------------------------------------ tokenisation
def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # The rendered text already carries the template's special tokens: add no BOS/EOS. Prompt
    # and reply are encoded separately so the prompt ids equal what generation starts from.
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _prompt_ids(tokenizer: Any, examples: Sequence[Example]) -> list[list[int]]:
    return _encode(tokenizer, [render_prompt(tokenizer, e.messages) for e in examples])


def _fits(ids: list[int], ex: Example, max_prompt_len: int, on_bad_row: str, source: str) -> bool:
    """False = skip this example; raises DataError when on_bad_row is "error"."""
    if len(ids) <= max_prompt_len:
        return True
    err = _error(source, ex.row, None,
                 f"prompt is {len(ids)} tokens, over max_prompt_len={max_prompt_len}")
    if on_bad_row == "error":
        raise err
    return False


def drop_old_turns(tokenizer: Any, examples: Sequence[Example],
                   max_prompt_len: int) -> list[Example]:
    """Drop the oldest dialogue turns of prompts over ``max_prompt_len`` tokens.

    A leading system message and the final user turn are always kept; turns go in pairs so the
    roles still alternate. A prompt that is still too long is left for ``_fits`` to report.
    """
    out = []
    for ex in examples:
        msgs = list(ex.messages)
        system = msgs[:1] if msgs and msgs[0].get("role") == "system" else []
        turns = msgs[len(system):]
        while len(turns) > 2 and _n_tokens(tokenizer, system + turns) > max_prompt_len:
            turns = turns[2:]
        out.append(replace(ex, messages=system + turns) if len(turns) < len(msgs) - len(system)
                   else ex)
    return out


def fit_prompts(tokenizer: Any, examples: Sequence[Example], cfg: DataConfig) -> list[Example]:
    """Apply ``cfg.truncate_prompt`` before tokenising."""
    if cfg.truncate_prompt == "drop_turns":
        return drop_old_turns(tokenizer, examples, cfg.max_prompt_len)
    return list(examples)


def _n_tokens(tokenizer: Any, messages: Messages) -> int:
    return len(_encode(tokenizer, [render_prompt(tokenizer, messages)])[0])


def tokenize_sft(tokenizer: Any, examples: Sequence[SFTExample], max_prompt_len: int,
                 max_len: int, on_bad_row: str = "error",
                 source: str = "data") -> tuple[list[dict[str, list[int]]], int]:
    """Items ``{"input_ids": [n], "labels": [n]}`` with n <= max_len and labels -100 on the
    prompt (loss on the reply only; the reply is truncated to fit). Returns (items, n_skipped)."""
    replies = _encode(tokenizer, [render_response(tokenizer, e.messages, e.response)
                                  for e in examples])
    items, skipped = [], 0
    for ex, p, r in zip(examples, _prompt_ids(tokenizer, examples), replies, strict=True):
        if not _fits(p, ex, max_prompt_len, on_bad_row, source):
            skipped += 1
            continue
        r = r[: max_len - len(p)]
        items.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    return items, skipped


def tokenize_preference(tokenizer: Any, examples: Sequence[PreferenceExample],
                        max_prompt_len: int, max_len: int, on_bad_row: str = "error",
                        source: str = "data") -> tuple[list[dict[str, list[int]]], int]:
    """Items ``{"chosen_ids": [n1], "rejected_ids": [n2]}``: prompt + reply, each <= max_len.
    Returns (items, n_skipped)."""
    def replies(attr: str) -> list[list[int]]:
        return _encode(tokenizer, [render_response(tokenizer, e.messages, getattr(e, attr))
                                   for e in examples])

    rows = zip(examples, _prompt_ids(tokenizer, examples), replies("chosen"),
               replies("rejected"), strict=True)
    items, skipped = [], 0
    for ex, p, c, r in rows:
        if not _fits(p, ex, max_prompt_len, on_bad_row, source):
            skipped += 1
            continue
        room = max_len - len(p)
        items.append({"chosen_ids": p + c[:room], "rejected_ids": p + r[:room]})
    return items, skipped


def tokenize_prompts(tokenizer: Any, examples: Sequence[Example], max_prompt_len: int,
                     on_bad_row: str = "error",
                     source: str = "data") -> tuple[list[dict[str, Any]], int]:
    """Items ``{"input_ids": [n], "messages": Messages, "row": int}`` (n <= max_prompt_len) for
    generation. Returns (items, n_skipped)."""
    items, skipped = [], 0
    for ex, p in zip(examples, _prompt_ids(tokenizer, examples), strict=True):
        if not _fits(p, ex, max_prompt_len, on_bad_row, source):
            skipped += 1
            continue
        items.append({"input_ids": p, "messages": ex.messages, "row": ex.row})
    return items, skipped


def pack_sft(items: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedily concatenate consecutive SFT items into sequences of at most max_len tokens.

    Standard simple packing: the causal attention of a packed sequence crosses example
    boundaries (an example sees the ones before it; no block-diagonal mask, positions keep
    counting). No loss crosses a boundary: an example starts with prompt tokens, labelled -100.
    """
    packed: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": []}
    for item in items:
        n = len(item["input_ids"])
        if n > max_len:
            raise ValueError(f"an item of {n} tokens is longer than max_len={max_len}")
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_len:
            packed.append(cur)
            cur = {"input_ids": [], "labels": []}
        cur["input_ids"] += item["input_ids"]
        cur["labels"] += item["labels"]
    if cur["input_ids"]:
        packed.append(cur)
    return packed


# --------------------------------------------------------------------------------- collation
def _pad(seqs: Sequence[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """LongTensor [B, L] with L = the longest sequence, padded with ``value``."""
    import torch

    if not seqs:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s) for s in seqs)
    fill = [[value] * (width - len(s)) for s in seqs]
    rows = [f + list(s) if left else list(s) + f for s, f in zip(seqs, fill, strict=True)]
    return torch.tensor(rows, dtype=torch.long)


def _ones(seqs: Sequence[list[int]]) -> list[list[int]]:
    return [[1] * len(s) for s in seqs]


def collate_sft(items: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), [B, L]."""
    ids = [it["input_ids"] for it in items]
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _pad(_ones(ids), 0),
        "labels": _pad([it["labels"] for it in items], IGNORE_INDEX),
    }


def collate_preference(items: Sequence[dict[str, list[int]]],
                       pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` [2B, L]: rows 0..B-1 are the chosen
    sequences, rows B..2B-1 the rejected ones (row i and B+i form a pair)."""
    ids = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    return {"input_ids": _pad(ids, pad_id), "attention_mask": _pad(_ones(ids), 0)}


def right_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring batches: (ids [B, L], mask [B, L]), RIGHT-padded."""
    return _pad(seqs, pad_id), _pad(_ones(seqs), 0)


def left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation prompts: (ids [B, L], mask [B, L]), LEFT-padded so every prompt ends at the
    last column and generation continues right after it."""
    return _pad(seqs, pad_id, left=True), _pad(_ones(seqs), 0, left=True)
