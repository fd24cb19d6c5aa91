"""Reading chat messages into one table, and splitting it by conversation.

The table has the columns ``conversation_id, turn, speaker, text, split``.
Every file is either read into that table or refused with a one-line
NextwordError that names the file and, where there is one, the line: a
line is the file's line as an editor counts it (``\n``, ``\r\n`` and a
lone ``\r`` each end one, and a message with line breaks inside its quotes
spans several), never a count of data rows.

Decisions where the input is silent:

* Without a ``conversation_id`` column, consecutive rows are grouped into
  blocks of ``data.block_messages`` messages; each block is a conversation,
  so context still flows between neighbouring messages and the split still
  has units to assign. With the column, a blank id is refused: guessing
  which conversation the row belongs to could join two of them.
* Without a ``turn`` column, rows are numbered in file order per conversation.
  With it, a turn is a whole number of at most 18 digits (``3``, ``-1`` and
  ``3.0`` are; ``1e3``, ``inf``, ``nan`` and blanks are refused), so it fits
  in an int64.
* An optional ``split`` column (train/val/test, any case) overrides the hash
  split, for data that comes with its own split; any other value is refused.
* ``speaker`` is ``user`` or ``agent`` in any case with spaces around;
  anything else is refused.
* Column names are matched without case or surrounding spaces. Other
  columns, and columns with no name, are ignored; a column we read that is
  named twice is refused.
* A row with more fields than the header is refused. A row with fewer is
  read with the missing fields empty (pandas pads them and cannot say it
  did), so a missing text is a blank message, and a missing speaker,
  conversation_id, turn or split is refused like a blank one.
* A row whose fields are all blank (an empty line, or a line of only commas
  and spaces) is skipped, and so are blank lines before the header.
* Blank messages are dropped and counted.
* The file is UTF-8, with or without a byte order mark. A NUL byte anywhere
  marks it as binary, and invalid UTF-8 anywhere is refused with its line.
* Text is kept exactly as written: numbers stay strings, and words such as
  ``NA`` or ``null`` are text, not missing values.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from nextword.config import SPEAKERS
from nextword.errors import NextwordError
from nextword.text import tokenize

log = logging.getLogger(__name__)

COLUMNS = ["conversation_id", "turn", "speaker", "text", "split"]
SPLITS = ("train", "val", "test")


# What the CSV parser (pandas' C engine) ends a line with.
LINE_BREAK = r"\r\n|\r|\n"
LEADING_BLANK_LINES = re.compile(r"(?:[ \t]*(?:\r\n|\r|\n))*")
WHOLE_NUMBER = r"[+-]?0*[0-9]{1,18}(?:\.0*)?"
# Every field a string as written; blank lines kept as rows so each row's line can be counted;
# header=None because with a header pandas takes extra leading fields as an index instead of refusing them.
CSV_OPTIONS = dict(header=None, dtype=str, keep_default_na=False, skip_blank_lines=False, engine="c")


def _line_at(data: bytes | str, offset: int) -> int:
    """The line that holds position ``offset`` of ``data``."""
    pattern = LINE_BREAK.encode() if isinstance(data, bytes) else LINE_BREAK
    return len(re.findall(pattern, data[:offset])) + 1


def _show(value: str, limit: int = 40) -> str:
    """A value for a one-line message: quoted, escaped, and cut short."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."


def _read_bytes(path: Path) -> bytes:
    try:
        if path.is_dir():
            raise NextwordError(f"{path}: is a folder, expected a file")
        return path.read_bytes()
    except FileNotFoundError:
        raise NextwordError(f"{path}: file not found") from None
    except PermissionError:
        raise NextwordError(f"{path}: permission denied") from None
    except OSError as err:
        raise NextwordError(f"{path}: cannot read the file ({err.strerror or type(err).__name__})") from None


def _read_text(path: Path) -> str:
    """The whole file as text, without a byte order mark; refused if it is empty, binary or not UTF-8."""
    data = _read_bytes(path)
    if not data.strip():
        raise NextwordError(f"{path}: file is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise NextwordError(f"{path}: line {_line_at(data, nul)}: binary data (a NUL byte), expected UTF-8 text")
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        raise NextwordError(f"{path}: line {_line_at(data, offset)}: not UTF-8 text (byte offset {offset})") from None
    if not text.strip():
        raise NextwordError(f"{path}: file is empty")
    return text


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on ``key``: adding rows never moves a conversation."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(conversation_ids: pd.Series, val: float, test: float) -> pd.Series:
    fractions = conversation_ids.astype(str).map(stable_fraction)
    split = pd.Series("train", index=conversation_ids.index, dtype=object)
    split[fractions < test + val] = "val"
    split[fractions < test] = "test"
    return split


def _breaks(records: pd.DataFrame) -> np.ndarray:
    """How many line breaks each record holds inside its quotes."""
    counts = [records[column].str.count(LINE_BREAK).to_numpy(dtype=np.int64) for column in records.columns]
    return np.sum(counts, axis=0, dtype=np.int64) if counts else np.zeros(len(records), dtype=np.int64)


def _record_lines(records: pd.DataFrame, first_line: int) -> np.ndarray:
    """The line each record starts on: a record takes one line plus the line breaks inside its quotes."""
    spans = 1 + _breaks(records)
    return first_line + np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)


def _line_of_record(text: str, record: int, first_line: int) -> int:
    """The line record ``record`` (0 is the header) starts on, counted from the records before it."""
    if record == 0:
        return first_line
    before = pd.read_csv(io.StringIO(text), nrows=record, **CSV_OPTIONS)
    return first_line + record + int(_breaks(before).sum())


def _parser_problem(text: str, err: ValueError, first_line: int) -> str:
    """pandas' complaint about the CSV in one line, its record number turned into the file's line."""
    message = str(err)
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    quote = re.search(r"EOF inside string starting at row (\d+)", message)
    try:
        if fields:
            line = _line_of_record(text, int(fields[2]) - 1, first_line)
            return f"line {line}: expected {fields[1]} fields, saw {fields[3]}"
        if quote:
            return f"line {_line_of_record(text, int(quote[1]), first_line)}: a quoted field is never closed"
    except ValueError:
        pass  # the records before the bad one did not read again: give pandas' own words
    if isinstance(err, pd.errors.EmptyDataError):
        return "file is empty"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else f"cannot read the CSV ({type(err).__name__})"


def _first_bad(path: Path, column: str, values: pd.Series, bad: pd.Series, lines: np.ndarray, why: str):
    """Refuse the first row where ``bad`` holds, naming its line and value."""
    if bad.any():
        row = int(np.argmax(bad.to_numpy(dtype=bool)))
        raise NextwordError(f"{path}: line {lines[row]}, column '{column}': {_show(values.iloc[row])} {why}")


def _header(path: Path, names: list[str], line: int) -> dict[str, int]:
    """Where each column we read sits; refuse a missing text or speaker, or a column named twice."""
    positions: dict[str, int] = {}
    for index, name in enumerate(names):
        if name not in COLUMNS:
            continue
        if name in positions:
            raise NextwordError(
                f"{path}: line {line}: columns {positions[name] + 1} and {index + 1} are both named '{name}'"
            )
        positions[name] = index
    for column in ("text", "speaker"):
        if column not in positions:
            found = ", ".join(_show(name) for name in names[:10]) + (", ..." if len(names) > 10 else "")
            hint = "; the file looks semicolon-separated, expected commas" if any(";" in n for n in names) else ""
            raise NextwordError(f"{path}: no '{column}' column (found {found}){hint}")
    return positions


def _turns(path: Path, raw: pd.Series, lines: np.ndarray) -> pd.Series:
    turn = raw.str.strip()
    bad = ~turn.str.fullmatch(WHOLE_NUMBER)
    _first_bad(path, "turn", raw, bad, lines, "is not a whole number of at most 18 digits")
    return turn.str.replace(r"\.0*$", "", regex=True).astype("int64")


def _read_records(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Every record of the CSV as strings, the header first, and the line each one starts on."""
    text = _read_text(path)
    skipped = LEADING_BLANK_LINES.match(text)[0]
    text = text[len(skipped):]
    first_line = _line_at(skipped, len(skipped))
    try:
        records = pd.read_csv(io.StringIO(text), **CSV_OPTIONS)
    except ValueError as err:  # pandas' ParserError and EmptyDataError
        raise NextwordError(f"{path}: {_parser_problem(text, err, first_line)}") from None
    return records, _record_lines(records, first_line)


def read_csv_messages(path: str | Path, block_messages: int = 20) -> pd.DataFrame:
    """Read a chat CSV (``speaker``, ``text``; optional ``conversation_id``, ``turn``, ``split``).

    Returns ``speaker``, ``text``, ``conversation_id``, ``turn`` and, when
    the file has it, ``split``; refuses anything else in one line.
    """
    path = Path(path)
    records, lines = _read_records(path)
    names = [str(name).strip().lower() for name in records.iloc[0]]
    positions = _header(path, names, int(lines[0]))
    rows = records.iloc[1:].reset_index(drop=True)
    lines = lines[1:]
    blank = (rows.apply(lambda column: column.str.strip()) == "").all(axis=1).to_numpy(dtype=bool)
    rows, lines = rows[~blank].reset_index(drop=True), lines[~blank]
    if rows.empty:
        raise NextwordError(f"{path}: no data rows, only a header")
    df = pd.DataFrame({name: rows[index] for name, index in positions.items()})

    speaker = df["speaker"].str.strip().str.lower()
    _first_bad(path, "speaker", df["speaker"], ~speaker.isin(SPEAKERS), lines, "is not 'user' or 'agent'")
    out = pd.DataFrame({"speaker": speaker, "text": df["text"]})
    if "conversation_id" in df.columns:
        conversation = df["conversation_id"].str.strip()
        _first_bad(path, "conversation_id", df["conversation_id"], conversation == "", lines,
                   "is blank; with this column every row needs a conversation id")
        out["conversation_id"] = conversation
    else:
        out["conversation_id"] = [f"block-{i // block_messages}" for i in range(len(df))]
    if "turn" in df.columns:
        out["turn"] = _turns(path, df["turn"], lines)
    else:
        out["turn"] = out.groupby("conversation_id", sort=False).cumcount()
    if "split" in df.columns:
        split = df["split"].str.strip().str.lower()
        _first_bad(path, "split", df["split"], ~split.isin(SPLITS), lines, "is not train, val or test")
        out["split"] = split
    return out


TEXT_SPLIT_FILES = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}


def read_text_messages(path: str | Path) -> pd.DataFrame:
    """A plain-text corpus: each non-blank line is one sequence (one conversation, one message).

    ``path`` is a file, split by the hash of the line number like any other
    corpus, or a folder holding ``train.txt``, ``valid.txt`` and ``test.txt``
    (the layout of WikiText-2), whose split is kept as given.
    """
    path = Path(path)
    if path.is_dir():
        parts = []
        for split, name in TEXT_SPLIT_FILES.items():
            if not (path / name).exists():
                raise NextwordError(f"{path}: a text corpus folder needs {', '.join(TEXT_SPLIT_FILES.values())}; "
                                    f"{name} is missing")
            part = read_text_messages(path / name)
            part["conversation_id"] = split + "-" + part["conversation_id"]
            part["split"] = split
            parts.append(part)
        return pd.concat(parts, ignore_index=True)
    lines = _read_text(path).splitlines()
    return pd.DataFrame(
        {
            "conversation_id": [f"line-{i + 1}" for i in range(len(lines))],
            "turn": 0,
            "speaker": "user",
            "text": lines,
        }
    )


def prepare(df: pd.DataFrame, source: str, val: float, test: float) -> pd.DataFrame:
    """Drop blank messages, assign splits, order by conversation and turn, check there is text."""
    blank = df["text"].str.strip() == ""
    if blank.any():
        log.info("%s: skipped %d blank messages", source, int(blank.sum()))
    df = df[~blank].copy()
    if df.empty or not any(tokenize(t) for t in df["text"]):
        raise NextwordError(f"{source}: no message has any word or punctuation token")
    if "split" not in df.columns:
        df["split"] = assign_splits(df["conversation_id"], val, test)
    # Keep the file's conversation order; within a conversation, order by turn.
    order = {cid: i for i, cid in enumerate(pd.unique(df["conversation_id"]))}
    df["_conv_order"] = df["conversation_id"].map(order)
    df = df.sort_values(["_conv_order", "turn"], kind="stable").drop(columns="_conv_order")
    return df[COLUMNS].reset_index(drop=True)


def load_messages(path: str | Path, fmt: str, val: float, test: float, block_messages: int = 20) -> pd.DataFrame:
    if fmt == "text":
        df = read_text_messages(path)
    else:
        df = read_csv_messages(path, block_messages)
    return prepare(df, str(path), val, test)
