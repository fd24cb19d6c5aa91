"""Reading chat messages into one table, and splitting it by conversation.

The table has the columns ``conversation_id, turn, speaker, text, split``.
Decisions where the input is silent:

* Without a ``conversation_id`` column, consecutive rows are grouped into
  blocks of ``data.block_messages`` messages; each block is a conversation,
  so context still flows between neighbouring messages and the split still
  has units to assign.
* Without a ``turn`` column, rows are numbered in file order per conversation.
* An optional ``split`` column (train/val/test) overrides the hash split,
  for data that comes with its own split.
* Blank messages are dropped and counted.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pandas as pd

from nextword.errors import NextwordError
from nextword.text import tokenize

log = logging.getLogger(__name__)

COLUMNS = ["conversation_id", "turn", "speaker", "text", "split"]
SPLITS = ("train", "val", "test")


def _check_readable(path: Path) -> bytes:
    if not path.exists():
        raise NextwordError(f"{path}: file not found")
    if path.is_dir():
        raise NextwordError(f"{path}: is a folder, expected a file")
    head = path.open("rb").read(1 << 16)
    if not head.strip():
        raise NextwordError(f"{path}: file is empty")
    if b"\x00" in head:
        raise NextwordError(f"{path}: binary data, expected UTF-8 text")
    return head


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


def read_csv_messages(path: str | Path, block_messages: int = 20) -> pd.DataFrame:
    """Read a chat CSV (``speaker``, ``text``; optional ``conversation_id``, ``turn``, ``split``)."""
    path = Path(path)
    _check_readable(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise NextwordError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except pd.errors.EmptyDataError:
        raise NextwordError(f"{path}: file is empty") from None
    except pd.errors.ParserError as err:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
        detail = f"line {m[2]}: expected {m[1]} fields, saw {m[3]}" if m else str(err).strip().splitlines()[-1]
        raise NextwordError(f"{path}: {detail}") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    for column in ("text", "speaker"):
        if column not in df.columns:
            found = ", ".join(repr(c) for c in df.columns)
            hint = "; the file looks semicolon-separated, expected commas" if any(";" in c for c in df.columns) else ""
            raise NextwordError(f"{path}: no '{column}' column (found {found}){hint}")
    if df.empty:
        raise NextwordError(f"{path}: no data rows, only a header")

    speaker = df["speaker"].str.strip().str.lower()
    bad = ~speaker.isin(["user", "agent"])
    if bad.any():
        row = int(bad.idxmax())
        raise NextwordError(
            f"{path}: row {row + 1}, column 'speaker': {df['speaker'][row]!r} is not 'user' or 'agent'"
        )
    out = pd.DataFrame({"speaker": speaker, "text": df["text"]})
    if "conversation_id" in df.columns:
        out["conversation_id"] = df["conversation_id"].str.strip()
    else:
        out["conversation_id"] = [f"block-{i // block_messages}" for i in range(len(df))]
    if "turn" in df.columns:
        turn = pd.to_numeric(df["turn"].str.strip(), errors="coerce")
        if turn.isna().any() or (turn % 1 != 0).any():
            row = int((turn.isna() | (turn % 1 != 0)).idxmax())
            raise NextwordError(f"{path}: row {row + 1}, column 'turn': {df['turn'][row]!r} is not a whole number")
        out["turn"] = turn.astype("int64")
    else:
        out["turn"] = out.groupby("conversation_id", sort=False).cumcount()
    if "split" in df.columns:
        split = df["split"].str.strip().str.lower()
        bad = ~split.isin(SPLITS)
        if bad.any():
            row = int(bad.idxmax())
            raise NextwordError(f"{path}: row {row + 1}, column 'split': {df['split'][row]!r} is not train, val or test")
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
    _check_readable(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise NextwordError(f"{path}: not UTF-8 text (byte {err.start})") from None
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
