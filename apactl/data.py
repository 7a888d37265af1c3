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
import io
import json
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from apactl.errors import DataError
from apactl.sources import hub_offline, hub_reachable, looks_local, resolve_source

if TYPE_CHECKING:
    import torch

    from apactl.config import DataConfig, FieldMap

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


def _one_line(text: str) -> str:
    # Messages quote file content (column names, paths): keep them on one line and printable
    # (a lone surrogate from undecodable bytes would make printing the message itself fail).
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(source: str, row: int | None, name: str | None, problem: str) -> DataError:
    detail = problem if name is None else f"field '{name}': {problem}"
    head = source if row is None else f"{source}: row {row}"
    return DataError(_one_line(f"{head}: {detail}"), source, row, _one_line(detail))


class _BadField(Exception):
    """Raised by the row parsers, which know the field (None: the whole row) but not the source
    or row number."""

    def __init__(self, name: str | None, problem: str):
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
class FormatVote:
    """How ``data.format: auto`` was decided: each row that is a mapping names the format its
    columns fit; the most common one wins (one odd row cannot flip the whole file)."""

    rows: int  # rows that are mappings (the voters)
    agree: int  # rows whose columns fit the chosen format
    first_other: int | None = None  # source row of the first row that fits another format
    other_format: str | None = None  # what that row looks like ("unknown": no format)


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
    skipped_errors: list[DataError] = field(default_factory=list, repr=False)  # the same rows
    detected: FormatVote | None = None  # data.format: auto: how the format was decided
    n_duplicates: int = 0  # training rows equal to an earlier training row
    n_eval_copies: int = 0  # held-out rows equal to a training row

    def skip(self, err: DataError) -> None:
        """Count a dropped row; the first MAX_REPORTED are kept to say which rows they were."""
        self.n_skipped += 1
        if len(self.skipped) < MAX_REPORTED:
            self.skipped.append(str(err))
            self.skipped_errors.append(err)

    def skipped_summary(self) -> str:
        """``3 bad rows skipped: row 4 (field 'chosen': same as 'rejected'), row 9 (...)``, the
        first MAX_REPORTED then ``, and N more``; rows of another file (an eval_split file) are
        prefixed with its name. "" when no row was skipped."""
        if not self.n_skipped:
            return ""
        shown = [self._describe(err) for err in self.skipped_errors]
        more = self.n_skipped - len(shown)
        rows = "row" if self.n_skipped == 1 else "rows"
        return (f"{self.n_skipped} bad {rows} skipped: {', '.join(shown)}"
                + (f", and {more} more" if more else ""))

    def format_note(self) -> str:
        """``format 'sft'``, and for a detected format how many rows agree on it:
        ``format 'sft' (detected: 40 of 48 rows; row 40 looks 'preference')``."""
        vote = self.detected
        if vote is None:
            return f"format '{self.format}'"
        other = (f"; row {vote.first_other} looks '{vote.other_format}'"
                 if vote.first_other is not None else "")
        return f"format '{self.format}' (detected: {vote.agree} of {vote.rows} rows{other})"

    def check_skipped(self, max_fraction: float) -> None:
        """Raise DataError when more than ``max_fraction`` of the rows read were skipped as
        bad: a file that is mostly bad is the wrong file, or read as the wrong format."""
        if self.n_skipped <= max_fraction * self.total_rows:
            return
        first = self._describe(self.skipped_errors[0]) if self.skipped_errors else "-"
        raise DataError(f"{self.source}: {self.n_skipped} of {self.total_rows} rows are bad "
                        f"({100 * self.n_skipped / self.total_rows:.0f}%), more than "
                        f"data.max_bad_fraction={max_fraction:g} that on_bad_row=skip may drop "
                        f"({self.format_note()}; first: {first})", self.source)

    def _describe(self, err: DataError) -> str:
        where = "" if err.source in (None, self.source) else f"{err.source} "
        return f"{where}row {err.row} ({err.detail})"

    def summary(self) -> str:
        """``source (format): N rows, T train, E eval`` and the skipped_summary, if any."""
        text = (f"{self.source} ({self.format}): {self.total_rows} rows, {self.n_train} train, "
                f"{self.n_eval} eval")
        return text + (f"; {self.skipped_summary()}" if self.n_skipped else "")


# ----------------------------------------------------------------------------------- loading
FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class UnreadableRow:
    """Stands in for a row of a local file that could not be read (invalid JSON or UTF-8, a CSV
    line with the wrong number of cells): a bad row like any other, so ``on_bad_row: skip`` can
    drop it and the message names its row."""

    name: str | None  # the field the problem is in, when known
    problem: str


class _BadFile(Exception):
    """Raised by the file readers, which know the row (None: the whole file) but not the name
    the user gave the file."""

    def __init__(self, problem: str, row: int | None = None):
        super().__init__(problem)
        self.problem, self.row = problem, row


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


def load_rows(cfg: DataConfig, split: str | None = None) -> tuple[list[Any], str]:
    """Raw rows in source order and a display name for messages.

    A local file is a single split, so ``split`` only applies to hub datasets. Hub rows are
    dicts; for what a local file's rows can be, see ``read_local``.
    """
    if looks_local(cfg.source):
        return read_local(resolve_source(cfg.source)), cfg.source
    _quiet_datasets()
    import datasets

    split = split or cfg.split
    name = _hub_name(cfg, split)
    if not hub_reachable(cfg.source, "dataset"):
        # Only the local cache can help; asking datasets for it offline skips its retries.
        try:
            with _datasets_offline():
                ds = datasets.load_dataset(cfg.source, cfg.subset, data_dir=cfg.data_dir,
                                           split=split)
        except Exception:  # noqa: BLE001 - not cached: the offline route is the message
            why = "is off (HF_HUB_OFFLINE)" if hub_offline() else "cannot be reached"
            raise DataError(
                f"{name}: the Hugging Face hub {why} and the dataset is not in the local cache; "
                f"offline, download its file once ({cfg.data_dir + '/' if cfg.data_dir else ''}"
                f"{split}.jsonl.gz, or as the dataset names it) and pass "
                f"data.source=PATH/{split}.jsonl.gz") from None
        return ds.to_list(), name
    try:
        ds = datasets.load_dataset(cfg.source, cfg.subset, data_dir=cfg.data_dir, split=split)
    except Exception as exc:  # hub/network/config errors carry long messages; keep one line
        raise DataError(f"{name}: cannot load: {_root_message(exc)}") from exc
    return ds.to_list(), name


@contextmanager
def _datasets_offline() -> Iterator[None]:
    """``datasets`` in offline mode for one call: it reads its cache and makes no request.
    (Its own switch, set from the environment at import; flipped here and put back.)"""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _hub_name(cfg: DataConfig, split: str) -> str:
    """``owner/name:subset/data_dir[split]``, with the optional parts left out."""
    name = cfg.source + (f":{cfg.subset}" if cfg.subset else "")
    return name + (f"/{cfg.data_dir}" if cfg.data_dir else "") + f"[{split}]"


def read_local(ref: str) -> list[Any]:
    """Rows of one local .jsonl/.json/.parquet/.csv file (optionally .gz), in file order.

    A row is normally a dict; a JSON value that is not an object is returned as it is and a row
    that cannot be read is an ``UnreadableRow``, both to be reported as bad rows. Rows count
    from 0 and blank lines are not rows (as in the ``datasets`` readers this replaced). The file
    is read here, not through ``datasets``: a local load makes no hub request, reads no hub
    cache and sends no telemetry, whatever the environment says.
    """
    path = Path(ref).expanduser()
    suffix = _file_type(path, ref)
    try:
        rows = _read(path, suffix)
    except _BadFile as bad:
        raise _error(ref, bad.row, None, bad.problem) from None
    except Exception as exc:  # pyarrow's errors: not parquet, corrupt pages, ...
        raise _error(ref, None, None, f"cannot read as {suffix[1:]}: {_root_message(exc)}") \
            from exc
    if not rows:
        raise _error(ref, None, None, "empty file (no rows)")
    return rows


def _file_type(path: Path, ref: str) -> str:
    """".jsonl", ".json", ".parquet" or ".csv", once ``path`` is known to be such a file."""
    expected = "expected a .jsonl, .json, .parquet or .csv file, optionally .gz"
    if path.is_dir():
        raise _error(ref, None, None, f"is a directory; {expected}")
    if not path.exists():
        raise _error(ref, None, None, "file not found")
    if not path.is_file():  # a FIFO or device could block or never end
        raise _error(ref, None, None, f"not a regular file; {expected}")
    suffix = Path(path.name.lower().removesuffix(".gz")).suffix
    if suffix not in FILE_TYPES:
        raise _error(ref, None, None, f"unsupported file type; {expected}")
    return suffix


def _read(path: Path, suffix: str) -> list[Any]:
    data = _file_bytes(path)
    if suffix == ".parquet":
        return _parquet_rows(data)
    text, raw = _decode(data)
    if suffix == ".csv":
        return _csv_rows(text, raw)
    return _json_rows(text, raw) if suffix == ".json" else _jsonl_rows(text, raw)


def _file_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in .gz."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _BadFile(f"cannot read: {exc.strerror or exc}") from None
    if not path.name.lower().endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except EOFError:
        raise _BadFile("corrupt gzip file: truncated (the compressed data stops before its "
                       "end)") from None
    except (OSError, zlib.error) as exc:  # not gzip at all, or damaged data (CRC, bad block)
        why = _root_message(exc)
        if why.startswith("Not a gzipped file"):
            raise _BadFile(f"not a valid gzip file: {why}") from None
        raise _BadFile(f"corrupt gzip file: {why}") from None


# Undecodable bytes are decoded to lone surrogates (U+DC80..U+DCFF, "surrogateescape") so rows
# can still be split and the bytes reported with the row and field they are in. A lone
# surrogate can also come from a JSON escape ("\udc80"; a valid pair makes one character).
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace


def _decode(data: bytes) -> tuple[str, bool]:
    """(text, whether some bytes were not UTF-8, so it holds surrogates)."""
    try:
        text, raw = data.decode("utf-8"), False
    except UnicodeDecodeError:
        text, raw = data.decode("utf-8", errors="surrogateescape"), True
    return text.removeprefix("\ufeff"), raw  # a byte-order mark (Excel, Notepad) is not data


def _suspect(text: str, raw: bool, pos: int = 0, end: int | None = None) -> bool:
    """Whether text[pos:end] may give a lone surrogate; cheap tests first, as this runs on
    every row."""
    end = len(text) if end is None else end
    return ((raw and _SURROGATE.search(text, pos, end) is not None)
            or ("\\u" in text[pos:end] and _ESCAPED_SURROGATE.search(text, pos, end) is not None))


def _bad_unicode(value: Any) -> tuple[str | None, str] | None:
    """(field path, character) of the first lone surrogate in a parsed row, keys included; no
    tokenizer can encode one."""
    stack: list[tuple[str | None, Any]] = [(None, value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return name, found.group()
            continue
        if isinstance(item, dict):  # the key itself is checked under its own path too
            children = [(_join(name, str(k)), x) for k, v in item.items() for x in (k, v)]
        elif isinstance(item, list):
            children = [(f"{name or ''}[{i}]", v) for i, v in enumerate(item)]
        else:
            continue
        stack.extend(reversed(children))
    return None


def _join(name: str | None, key: str) -> str:
    return key if name is None else f"{name}.{key}"


def _surrogate_problem(char: str, where: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"invalid UTF-8: byte 0x{code - 0xDC00:02x} ({where})"
    return f"invalid Unicode: lone surrogate \\u{code:04x} ({where})"


def _unicode_checked(value: Any, where: str) -> Any:
    """``value``, or an UnreadableRow naming the field whose text is not valid Unicode."""
    bad = _bad_unicode(value)
    return value if bad is None else UnreadableRow(bad[0], _surrogate_problem(bad[1], where))


def _where(text: str, pos: int) -> str:
    line_start = text.rfind("\n", 0, pos) + 1
    return f"line {text.count(chr(10), 0, pos) + 1}, column {pos - line_start + 1}"


def _json_problem(exc: Exception, text: str, line: int) -> str:
    """Why ``text`` (its first line is the file's line ``line``) is not JSON, and where."""
    if not isinstance(exc, json.JSONDecodeError):  # nested too deeply, too many digits
        why = "nested too deeply" if isinstance(exc, RecursionError) else _root_message(exc)
        return f"invalid JSON: {why} (line {line})"
    where = f"line {line + exc.lineno - 1}, column {exc.colno}"
    bad = _SURROGATE.match(text, exc.pos)  # a stray byte outside any string
    return _surrogate_problem(bad.group(), where) if bad else f"invalid JSON: {exc.msg} ({where})"


def _jsonl_rows(text: str, raw: bool) -> list[Any]:
    """One JSON value per line. Blank lines are not rows, so messages give the line as well."""
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may be in a string
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError) as exc:
            rows.append(UnreadableRow(None, _json_problem(exc, line, n)))
            continue
        rows.append(_unicode_checked(value, f"line {n}") if _suspect(line, raw) else value)
    return rows


def _json_rows(text: str, raw: bool) -> list[Any]:
    """A JSON array of rows; or, as the ``datasets`` json reader also took, one value per line
    (a single value over several lines is one row)."""
    start = _WS.match(text).end()
    if text.startswith("[", start):
        return _json_array(text, start, raw)
    if start == len(text):
        return []
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return _jsonl_rows(text, raw)
    return [_unicode_checked(value, "line 1") if _suspect(text, raw) else value]


def _json_array(text: str, start: int, raw: bool) -> list[Any]:
    """The elements of the array at ``text[start]``, parsed one at a time so that a syntax
    error names its element (row); after one, the rest cannot be trusted: the file is bad."""
    decoder, rows = json.JSONDecoder(), []
    pos = _WS.match(text, start + 1).end()
    closed = text.startswith("]", pos)
    while not closed:
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as exc:
            line = 1 if isinstance(exc, json.JSONDecodeError) else text.count("\n", 0, pos) + 1
            raise _BadFile(_json_problem(exc, text, line), len(rows)) from None
        if _suspect(text, raw, pos, end):
            value = _unicode_checked(value, _where(text, pos))
        rows.append(value)
        pos = _WS.match(text, end).end()
        closed = text.startswith("]", pos)
        if not closed:
            if not text.startswith(",", pos):
                raise _BadFile(f"invalid JSON: expected ',' or ']' after the element "
                               f"({_where(text, pos)})", len(rows) - 1)
            pos = _WS.match(text, pos + 1).end()
    pos = _WS.match(text, pos + 1).end()  # past the "]"
    if pos < len(text):
        raise _BadFile(f"invalid JSON: extra data after the array ({_where(text, pos)})")
    if not rows:
        raise _BadFile("no rows (an empty JSON array)")
    return rows


@contextmanager
def _csv_field_limit(limit: int = 2**31 - 1) -> Iterator[None]:
    # The csv module refuses cells over 128 KiB, shorter than some dialogues. The limit is
    # process-wide, so the old one is put back.
    old = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_records(text: str) -> list[tuple[int, list[str]]]:
    """(first line, cells) of each non-blank record; a quoted cell can span lines."""
    # strict: an unclosed quote is an error, not a cell that swallows the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    line = 1
    with _csv_field_limit():
        try:
            for cells in reader:
                if not _blank_record(cells):
                    records.append((line, cells))
                line = reader.line_num + 1
        except csv.Error as exc:  # records[0] is the header: the bad record is row len - 1
            raise _BadFile(f"invalid CSV: {exc} (line {line})",
                           len(records) - 1 if records else None) from None
    return records


def _blank_record(cells: list[str]) -> bool:
    # An empty line gives [] and a whitespace-only one a single blank cell; a quoted empty cell
    # ('""', what a writer puts out for an empty one-column row) gives [""], which is a row.
    # Only ASCII blanks make a blank line: a cell of U+00A0 is a row (an empty prompt).
    return not cells or (len(cells) == 1 and cells[0] != "" and not cells[0].strip(" \t"))


def _csv_rows(text: str, raw: bool) -> list[Any]:
    """CSV cells are text: every value stays a string ("007" stays "007", "NA" stays "NA"; an
    empty cell is "" and is reported as empty text). The first record is the header."""
    records = _csv_records(text)
    if not records:
        return []
    header = records[0][1]
    for i, name in enumerate(header):
        if name in header[:i]:
            raise _BadFile(f"duplicate column {name!r} in the CSV header")
    if len(records) == 1:
        raise _BadFile("no rows (only a header line)")
    rows: list[Any] = []
    for line, cells in records[1:]:
        if len(cells) != len(header):
            rows.append(UnreadableRow(None, f"{len(cells)} cells, but the header has "
                                            f"{len(header)} columns (line {line})"))
            continue
        row = dict(zip(header, cells))
        rows.append(_unicode_checked(row, f"line {line}") if raw else row)
    return rows


def _parquet_rows(data: bytes) -> list[Any]:
    import pyarrow as pa  # installed with datasets; imported here because it is slow to import
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as exc:  # not parquet, or corrupt; the buffer's name is noise
        why = re.sub(r"^Could not open Parquet input source '[^']*': ", "", _root_message(exc))
        raise _BadFile(f"cannot read as parquet: {why}") from None
    if table.num_rows == 0:
        raise _BadFile("no rows (an empty table)")
    return table.to_pylist()


# ------------------------------------------------------------------------------ row parsing
def _get(mapping: dict[str, Any], key: str, name: str | None = None, what: str = "columns") -> Any:
    """``mapping[key]``; an absent key is a bad field ``name`` that lists the keys there are."""
    if key in mapping:
        return mapping[key]
    raise _BadField(name or key, f"missing; {what}: {_key_list(mapping)}")


def _key_list(mapping: dict[str, Any], limit: int = 12) -> str:
    keys = [str(k) for k in mapping]
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "") or "none"


# Characters that show nothing: str.strip() removes Unicode spaces (U+00A0, U+2003, ...) but
# not these format characters (zero-width space and joiners, word joiner, BOM).
_BLANK = re.compile("[\\s\u200b\u200c\u200d\u2060\ufeff]*")


def _blank(text: str) -> bool:
    """Whether ``text`` shows nothing: only whitespace and zero-width characters."""
    return _BLANK.fullmatch(text) is not None


def _text(value: Any, name: str, expected: str = "a string") -> str:
    if value is None:  # a null cell (parquet, JSON null): the column exists
        raise _BadField(name, "missing (null)")
    if not isinstance(value, str):
        raise _BadField(name, f"expected {expected}, got {type(value).__name__}")
    if _blank(value):
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
        role = _text(_get(msg, "role", f"{where}.role", "keys"), f"{where}.role")
        if role not in ROLES:
            raise _BadField(f"{where}.role", f"unknown role {role!r}; expected one of "
                                             f"{', '.join(ROLES)}")
        content = _get(msg, "content", f"{where}.content", "keys")
        if not (role == "system" and content == ""):  # an empty system turn is meaningful
            content = _text(content, f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _prompt(row: dict[str, Any], name: str) -> Messages:
    """A prompt column: a plain string (one user turn) or a list of messages."""
    value = _get(row, name)
    if isinstance(value, list):
        msgs = _messages(value, name)
        if msgs[-1]["role"] == "assistant":
            raise _BadField(name, "the prompt ends with an assistant message")
        return msgs
    return [{"role": "user", "content": _text(value, name, "a string or a list of messages")}]


def _reply(row: dict[str, Any], name: str) -> str:
    """A reply column: a string, or a messages list whose last message is the reply."""
    value = _get(row, name)
    if not isinstance(value, list):
        return _text(value, name, "a string or a list of messages")
    last = _messages(value, name)[-1]
    if last["role"] != "assistant":
        raise _BadField(name, f"last message must be the assistant reply, got {last['role']!r}")
    return last["content"]


def _chat(row: dict[str, Any], name: str) -> tuple[Messages, str]:
    msgs = _messages(_get(row, name), name)
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
        return parse_hh(_text(_get(row, name), name))
    except ValueError as exc:
        raise _BadField(name, str(exc)) from None


def _hh_pair(row: dict[str, Any], f: FieldMap) -> tuple[Messages, str, str]:
    prompt, chosen = _hh(row, f.chosen)
    other, rejected = _hh(row, f.rejected)
    if other != prompt:
        raise _BadField(f.rejected, f"the dialogue before the final reply differs from "
                                    f"'{f.chosen}'")
    return prompt, chosen, rejected


def _check_mapping(row: Any) -> dict[str, Any]:
    """A raw row that is a mapping of columns; else raises _BadField for the whole row."""
    if isinstance(row, UnreadableRow):
        raise _BadField(row.name, row.problem)
    if not isinstance(row, dict):
        raise _BadField(None, f"expected an object of columns ({{\"prompt\": ...}}), got "
                              f"{type(row).__name__}")
    return row


def _parse_row(raw: Any, fmt: str, kind: Kind, f: FieldMap, i: int) -> Example:
    """One raw row -> the example for ``kind``; raises _BadField."""
    row = _check_mapping(raw)
    if kind == "prompt":
        return PromptExample(_prompt_only(row, fmt, f), i)
    if fmt == "sft":
        return SFTExample(_prompt(row, f.prompt), _text(_get(row, f.response), f.response), i)
    if fmt == "chat":
        return SFTExample(*_chat(row, f.messages), i)
    if fmt == "hh":
        pair = PreferenceExample(*_hh_pair(row, f), i)
    else:
        prompt = _prompt(row, f.prompt)
        pair = PreferenceExample(prompt, _reply(row, f.chosen), _reply(row, f.rejected), i)
    if kind == "sft":
        return SFTExample(pair.messages, pair.chosen, i)
    # A pair of equal replies has no preference to learn (and gives a zero-margin pair).
    if pair.chosen.strip() == pair.rejected.strip():
        raise _BadField(f.chosen, f"same as '{f.rejected}'")
    return pair


def _prompt_only(row: dict[str, Any], fmt: str, f: FieldMap) -> Messages:
    """The prompt of any shape (held-out SFT or HH rows can feed RL); replies are not checked."""
    if fmt == "hh":
        return _hh(row, f.chosen)[0]
    if fmt != "chat":
        return _prompt(row, f.prompt)
    msgs = _messages(_get(row, f.messages), f.messages)
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
    fmt = _detect(row, fields)
    if fmt is None:
        raise _error(source, None, None, f"cannot detect the data format from columns "
                                         f"{sorted(map(str, row))}; set data.format or data.fields")
    return fmt


def _detect(cols: dict[str, Any], fields: FieldMap) -> str | None:
    keys = set(cols)
    if fields.chosen in keys and fields.rejected in keys:
        if fields.prompt in keys:
            return "preference"
        if _looks_hh(cols[fields.chosen]):
            return "hh"
    elif fields.messages in keys:
        return "chat"
    elif fields.prompt in keys:
        return "sft" if fields.response in keys else "prompt"
    return None


def _columns(rows: list[Any]) -> dict[str, Any]:
    """Column -> its first non-null value, over every row that is a mapping: the columns of the
    whole file, as a table reader sees them (a JSON row may leave out a key that others have)."""
    cols: dict[str, Any] = {}
    for row in rows:
        if isinstance(row, dict):
            for key, value in row.items():
                if cols.get(key) is None:
                    cols[key] = value
    return cols


def _expected_fields(cols: dict[str, Any], f: FieldMap, kind: Kind) -> tuple[str, ...]:
    """The columns of the row shape ``kind`` most plausibly needs, in the order to report them."""
    if kind == "prompt":
        return (f.prompt,)
    if kind == "sft":
        return (f.prompt, f.response)
    if _looks_hh(cols.get(f.chosen)):
        return (f.chosen, f.rejected)
    return (f.prompt, f.chosen, f.rejected)


def _row_format(row: Any, fields: FieldMap) -> str | None:
    """The format of one row's filled columns: a table (CSV, parquet) gives every row every
    column of the file, empty ("" or null) where the row has no value. A row whose filled
    columns fit no fuller shape than a prompt is taken by all its columns: an empty reply is
    a bad row of its file's format, not a row of another."""
    fmt = _detect({k: v for k, v in row.items() if v is not None and v != ""}, fields)
    return fmt if fmt not in (None, "prompt") else _detect(row, fields)


def _vote(rows: list[Any], start: int, fields: FieldMap) -> tuple[str | None, FormatVote]:
    """The format most rows fit (ties: the one seen first) and the vote behind it; when no row
    fits one on its own, the columns of the whole file decide (as a table reader sees them)."""
    formats = [(start + i, _row_format(row, fields)) for i, row in enumerate(rows)
               if isinstance(row, dict)]
    counts: dict[str, int] = {}
    for _, fmt in formats:
        if fmt is not None:
            counts[fmt] = counts.get(fmt, 0) + 1
    if not counts:
        fmt = _detect(_columns(rows), fields)
        return fmt, FormatVote(rows=len(formats), agree=len(formats) if fmt else 0)
    fmt = max(counts, key=lambda f: counts[f])  # max keeps the first of a tie
    vote = FormatVote(rows=len(formats), agree=counts[fmt])
    vote.first_other, vote.other_format = next(
        ((i, other or "unknown") for i, other in formats if other != fmt), (None, None))
    return fmt, vote


def _resolve_format(cfg: DataConfig, rows: list[Any], start: int, source: str,
                    kind: Kind) -> tuple[str, FormatVote | None]:
    """cfg.format, or the format most of ``rows`` (source rows start, start+1, ...) agree on,
    with the vote (None for an explicit format). When that format cannot give ``kind``, the
    error names the missing column and the columns its rows have."""
    if cfg.format != "auto":
        if cfg.format not in KIND_FORMATS[kind]:
            raise DataError(f"{source}: format '{cfg.format}' cannot give {kind} examples; "
                            f"expected {' or '.join(KIND_FORMATS[kind])} data")
        return cfg.format, None
    first = next((i for i, row in enumerate(rows) if isinstance(row, dict)), 0)
    try:
        _check_mapping(rows[first])
    except _BadField as bad:  # no row is an object: the first row's own problem says why
        raise _error(source, start, bad.name, bad.problem) from None
    fmt, vote = _vote(rows, start, cfg.fields)
    if fmt in KIND_FORMATS[kind]:
        return fmt, vote
    # The columns of the rows that voted for fmt (of every row when none fits a format).
    voters = [r for r in rows if isinstance(r, dict)
              and (fmt is None or vote.agree == vote.rows or _row_format(r, cfg.fields) == fmt)]
    first = next(i for i, r in enumerate(rows) if r is voters[0])
    cols = _columns(voters)
    agree = f" ({vote.agree} of {vote.rows} rows)" if vote.agree < vote.rows else ""
    why = (f"format '{fmt}'{agree} cannot give {kind} examples" if fmt else
           "cannot detect the data format; set data.format or data.fields")
    missing = [n for n in _expected_fields(cols, cfg.fields, kind) if n not in cols]
    if not missing:
        raise _error(source, None, None, f"{why}; columns: {_key_list(cols)}")
    raise _error(source, start + first, missing[0], f"missing; columns: {_key_list(cols)} "
                                                    f"({why})")


def _parse_rows(rows: list[Any], start: int, fmt: str, kind: Kind, cfg: DataConfig,
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
            report.skip(err)
    return out


def _n_held_out(cfg: DataConfig, n: int, source: str) -> int:
    k = cfg.eval_rows or (max(1, round(n * cfg.eval_fraction)) if cfg.eval_fraction else 0)
    if k >= n:
        raise DataError(f"{source}: holding out {k} of {n} rows for eval leaves none for "
                        "training; lower data.eval_rows or data.eval_fraction")
    return k


def _load_eval_split(cfg: DataConfig) -> tuple[list[Any], str]:
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
        raise DataError(f"{source}: no rows" + (f" after skip_rows={skip}" if skip else ""))
    fmt, vote = _resolve_format(cfg, rows, skip, source, kind)
    report = DataReport(source=source, format=fmt, total_rows=len(rows), detected=vote)
    if cfg.eval_split is not None:
        eval_rows, eval_source = _load_eval_split(cfg)
        eval_rows = eval_rows[: cfg.max_rows]
        # A separate file may have another shape (e.g. prompts to evaluate an SFT run on).
        eval_fmt = (_resolve_format(cfg, eval_rows, 0, eval_source, kind)[0] if eval_rows
                    else fmt)
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
    report.check_skipped(cfg.max_bad_fraction)
    seen = {_content(ex) for ex in train}
    report.n_duplicates = len(train) - len(seen)
    report.n_eval_copies = sum(_content(ex) in seen for ex in held_out)
    report.n_train, report.n_eval = len(train), len(held_out)
    return train, held_out, report


def _content(ex: Example) -> str:
    """What an example says, without its row number: equal for duplicated rows."""
    return json.dumps([type(ex).__name__, *(v for k, v in vars(ex).items() if k != "row")])


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


def _fits(ids: list[int], ex: Example, max_prompt_len: int, on_bad_row: str, source: str,
          report: DataReport | None) -> bool:
    """False = skip this example (recorded in ``report`` if given); raises DataError when
    on_bad_row is "error"."""
    if len(ids) <= max_prompt_len:
        return True
    err = _error(source, ex.row, None,
                 f"prompt is {len(ids)} tokens, over max_prompt_len={max_prompt_len}")
    if on_bad_row == "error":
        raise err
    if report is not None:
        report.skip(err)
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
                 max_len: int, on_bad_row: str = "error", source: str = "data",
                 report: DataReport | None = None) -> tuple[list[dict[str, list[int]]], int]:
    """Items ``{"input_ids": [n], "labels": [n]}`` with n <= max_len and labels -100 on the
    prompt (loss on the reply only; the reply is truncated to fit). Returns (items, n_skipped).

    Prompts over ``max_prompt_len`` are bad rows; with ``report``, skipped ones are also added to
    it (so report.n_skipped already counts them and its summary names them)."""
    replies = _encode(tokenizer, [render_response(tokenizer, e.messages, e.response)
                                  for e in examples])
    items, skipped = [], 0
    for ex, p, r in zip(examples, _prompt_ids(tokenizer, examples), replies, strict=True):
        if not _fits(p, ex, max_prompt_len, on_bad_row, source, report):
            skipped += 1
            continue
        r = r[: max_len - len(p)]
        items.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    return items, skipped


def tokenize_preference(tokenizer: Any, examples: Sequence[PreferenceExample],
                        max_prompt_len: int, max_len: int, on_bad_row: str = "error",
                        source: str = "data", report: DataReport | None = None,
                        ) -> tuple[list[dict[str, list[int]]], int]:
    """Items ``{"chosen_ids": [n1], "rejected_ids": [n2], "prompt_len": p}``: prompt + reply,
    each <= max_len, sharing their first p tokens (the prompt). Returns (items, n_skipped); bad
    rows and ``report`` as in tokenize_sft."""
    def replies(attr: str) -> list[list[int]]:
        return _encode(tokenizer, [render_response(tokenizer, e.messages, getattr(e, attr))
                                   for e in examples])

    rows = zip(examples, _prompt_ids(tokenizer, examples), replies("chosen"),
               replies("rejected"), strict=True)
    items, skipped = [], 0
    for ex, p, c, r in rows:
        if not _fits(p, ex, max_prompt_len, on_bad_row, source, report):
            skipped += 1
            continue
        room = max_len - len(p)
        items.append({"chosen_ids": p + c[:room], "rejected_ids": p + r[:room],
                      "prompt_len": len(p)})
    return items, skipped


def tokenize_prompts(tokenizer: Any, examples: Sequence[Example], max_prompt_len: int,
                     on_bad_row: str = "error", source: str = "data",
                     report: DataReport | None = None) -> tuple[list[dict[str, Any]], int]:
    """Items ``{"input_ids": [n], "messages": Messages, "row": int}`` (n <= max_prompt_len) for
    generation. Returns (items, n_skipped); bad rows and ``report`` as in tokenize_sft."""
    items, skipped = [], 0
    for ex, p in zip(examples, _prompt_ids(tokenizer, examples), strict=True):
        if not _fits(p, ex, max_prompt_len, on_bad_row, source, report):
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


def collate_dpo(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``collate_preference`` plus ``response_mask`` [2B, L] (1 on the reply tokens) and
    ``prompt_len`` [2B]; with reference log-probs on the items (``ref_chosen``,
    ``ref_rejected``), ``ref_logps`` [2B] float64 in the same row order."""
    import torch

    out = collate_preference(items, pad_id)
    both = [*items, *items]
    plen = torch.tensor([it["prompt_len"] for it in both])
    cols = torch.arange(out["input_ids"].shape[1]).unsqueeze(0)
    out["response_mask"] = (cols >= plen.unsqueeze(1)).long() * out["attention_mask"]
    out["prompt_len"] = plen
    if "ref_chosen" in items[0]:
        out["ref_logps"] = torch.tensor([it["ref_chosen"] for it in items]
                                        + [it["ref_rejected"] for it in items],
                                        dtype=torch.float64)
    return out


def right_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring batches: (ids [B, L], mask [B, L]), RIGHT-padded."""
    return _pad(seqs, pad_id), _pad(_ones(seqs), 0)


def left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generation prompts: (ids [B, L], mask [B, L]), LEFT-padded so every prompt ends at the
    last column and generation continues right after it."""
    return _pad(seqs, pad_id, left=True), _pad(_ones(seqs), 0, left=True)
