"""Every file is read into the documented table or refused in one line that names it: fuzzed with hypothesis.

Each property runs a fixed number of derandomized examples and no example
database, so CI sees the same inputs every run; each test asserts that
exactly that many inputs were tried.
"""

import re
from collections import Counter

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nextword.errors import NextwordError
from nextword.messages import COLUMNS, SPLITS, load_messages, read_csv_messages

EXAMPLES = 400
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRIED = Counter()

# --- what a read table or a refusal must look like ---------------------------------------------


def check_refusal(err: NextwordError, path) -> None:
    message = str(err)
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, message
    assert str(path) in message, message


def check_table(table: pd.DataFrame, prepared: bool) -> None:
    if prepared:
        assert list(table.columns) == COLUMNS
    else:
        assert {"conversation_id", "turn", "speaker", "text"} <= set(table.columns) <= set(COLUMNS)
    assert len(table) > 0
    assert isinstance(table.index, pd.RangeIndex) and table.index.start == 0
    assert not table.isna().any().any()
    assert table["speaker"].isin(["user", "agent"]).all()
    assert table["turn"].dtype == "int64"
    assert all(isinstance(v, str) and v.strip() == v != "" for v in table["conversation_id"])
    assert all(isinstance(v, str) for v in table["text"])
    if "split" in table.columns:
        assert table["split"].isin(SPLITS).all()
    if prepared:
        assert (table["text"].str.strip() != "").all()


def check_read_or_refused(path) -> None:
    """Both the reader and the whole ingest path either give the documented table or a NextwordError."""
    for prepared in (False, True):
        try:
            table = load_messages(path, "csv", 0.1, 0.1) if prepared else read_csv_messages(path)
        except NextwordError as err:
            check_refusal(err, path)
        else:
            check_table(table, prepared)


def fuzz(name: str, strategy, path, check=check_read_or_refused) -> int:
    """Write each file ``strategy`` draws to ``path`` and ``check`` it; return how many were tried."""

    TRIED[name] = 0

    @FUZZ
    @given(strategy)
    def one_input(drawn):
        TRIED[name] += 1
        data, *expected = drawn if isinstance(drawn, tuple) else (drawn,)
        path.write_bytes(data)
        check(path, *expected)

    one_input()
    return TRIED[name]


# --- (a) arbitrary bytes -------------------------------------------------------------------------

HEADS = [b"", b"speaker,text\n", b"\xef\xbb\xbfconversation_id,turn,speaker,text,split\r\n", b"speaker,text\nuser,"]
arbitrary_bytes = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(HEADS),
    st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))),
)


def test_arbitrary_bytes_are_read_or_refused_in_one_line(tmp_path):
    assert fuzz("bytes", arbitrary_bytes, tmp_path / "fuzz.csv") == EXAMPLES


# --- (b) CSV shapes: real column names and junk, ragged rows, quoting, line ends, encodings ----

NAMES = ["speaker", "text", "conversation_id", "turn", "split", " Speaker ", "TEXT", "", "notes", "speaker;text",
         "text.1", "Unnamed: 0"]
JUNK = ["", " ", "bot", "dev", "1e3", "inf", "-inf", "nan", "NaN", "1e309", "99999999999999999999", "0x10", "2.5",
        "a,b", 'say "hi"', '"', "line\nbreak", "cr\r", "crlf\r\n", "NA", "null", "00123", "\ufeff", "\u2028", ";"]
junk = st.one_of(st.sampled_from(JUNK), st.text(max_size=8))
# Mostly good values for the column, so that many files get past the first row; junk for the rest.
GOOD = {
    "speaker": ["user", "agent", " USER ", "Agent\t"],
    "conversation_id": ["c1", "c2", " c 3 "],
    "turn": ["0", "3", "3.0", "-1", "+7", "000000000000000000000042"],
    "split": ["train", "val", "TEST", " test "],
}
text = st.one_of(st.sampled_from(["hello world", "12345", "ok.", "caf\u00e9 ?", "a,b", 'say "hi"', "two\r\nlines"]),
                 st.text(max_size=12))


def values_for(name: str, messy: bool):
    name = name.strip().lower()
    good = text if name == "text" else st.sampled_from(GOOD.get(name, ["x"]))
    return st.one_of(good, good, good, junk) if messy else good


def write_field(value: str, quoting: str) -> str:
    needs_quotes = any(c in value for c in ',"\r\n')
    if quoting == "all" or (quoting == "minimal" and needs_quotes):
        return '"' + value.replace('"', '""') + '"'
    return value  # "raw": junk on purpose, quotes and line breaks as they come


@st.composite
def csv_shapes(draw):
    # Half the files are messy in every way at once; the other half are well formed but for
    # blank lines, line ends and layout, so that many files are read and the table is checked.
    messy = draw(st.booleans())
    extra = draw(st.lists(st.sampled_from(NAMES), max_size=3))
    if messy:
        header = draw(st.one_of(st.permutations(["speaker", "text", *extra]), st.just(extra or [""])))
    else:
        header = draw(st.permutations(["speaker", "text", *[n for n in extra if n.strip().lower() not in COLUMNS]]))
    rows = [header]
    for _ in range(draw(st.integers(0, 6))):
        row = [draw(values_for(name, messy)) for name in header]
        change = draw(st.sampled_from([0, 0, 0, -1, 1, 2])) if messy else 0  # fields missing or extra
        rows.append(row[:change] if change < 0 else row + ["extra"] * change)
    quoting = draw(st.sampled_from(["minimal", "all", "raw"] if messy else ["minimal", "all"]))
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines = [",".join(write_field(v, quoting) for v in row) for row in rows]
    for _ in range(draw(st.integers(0, 2))):  # blank lines anywhere, before the header too
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", " ", ",", ",,"])))
    encodings = ["utf-8", "utf-8-sig", "latin-1", "utf-16"] if messy else ["utf-8", "utf-8-sig"]
    data = (end.join(lines) + draw(st.sampled_from([end, "", end + end]))).encode(
        draw(st.sampled_from(encodings)), errors="replace")
    if messy and draw(st.booleans()):  # cut short, or with one junk byte, somewhere
        at = draw(st.integers(0, len(data)))
        junk_byte = draw(st.sampled_from([b"", b"\xff", b"\x00", b'"', b"\r"]))
        data = data[:at] + junk_byte + (data[at:] if draw(st.booleans()) else b"")
    return data


def test_csv_shapes_are_read_or_refused_in_one_line(tmp_path):
    assert fuzz("shapes", csv_shapes(), tmp_path / "fuzz.csv") == EXAMPLES


# --- (c) one known defect: the refusal names its line, and a clean file reads back as written --

SPEAKER = st.sampled_from(["user", "agent", "USER", " agent ", "Agent\t"])
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
DEFECTS = ["none", "none", "extra field", "bad speaker", "bad turn", "blank conversation", "bad split", "open quote"]


@st.composite
def files_with_one_defect(draw):
    """A CSV, the defect put in it, the line it is on, and the rows a reader should give."""
    optional = draw(st.lists(st.sampled_from(["conversation_id", "turn", "split", "notes"]), unique=True))
    header = draw(st.permutations(["speaker", "text", *optional]))
    n_rows = draw(st.integers(1, 6))
    rows = [
        {
            "speaker": draw(SPEAKER), "text": draw(TEXT), "notes": draw(TEXT),
            "conversation_id": draw(st.sampled_from(["c1", "c2", " c3 "])),
            "turn": draw(st.integers(-5, 10**17)), "split": draw(st.sampled_from(SPLITS)),
        }
        for _ in range(n_rows)
    ]
    defect = draw(st.sampled_from(DEFECTS))
    column = {"bad turn": "turn", "blank conversation": "conversation_id", "bad split": "split"}.get(defect)
    if column and column not in header:
        defect = "none"
    bad_row = n_rows - 1 if defect == "open quote" else draw(st.integers(0, n_rows - 1))
    quoting = draw(st.sampled_from(["minimal", "all"]))
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))

    def line_of(row: dict, index: int) -> str:
        values = {**row, "turn": str(row["turn"])}
        if index == bad_row:
            values.update({"bad speaker": {"speaker": "bot"}, "bad turn": {"turn": "2.5"},
                           "blank conversation": {"conversation_id": " "}, "bad split": {"split": "dev"}}
                          .get(defect, {}))
        fields = [write_field(values[name], quoting) for name in header]
        if index == bad_row and defect == "extra field":
            fields.append("extra")
        if index == bad_row and defect == "open quote":
            fields[-1] = '"' + values[header[-1]].replace('"', '""')
        return ",".join(fields)

    text = end * draw(st.integers(0, 2)) + ",".join(header) + end
    defect_line = None
    for index, row in enumerate(rows):
        text += end * draw(st.integers(0, 1))  # sometimes a blank line before the row
        if index == bad_row:
            defect_line = len(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
        text += line_of(row, index) + (end if index < n_rows - 1 or draw(st.booleans()) else "")
    data = text.encode(draw(st.sampled_from(["utf-8", "utf-8-sig"])))
    return data, header, defect, defect_line, rows


def check_defect(path, header, defect, line, rows) -> None:
    if defect == "none":
        table = read_csv_messages(path)
        assert list(table["speaker"]) == [r["speaker"].strip().lower() for r in rows]
        assert list(table["text"]) == [r["text"] for r in rows]
        if "turn" in header:
            assert list(table["turn"]) == [r["turn"] for r in rows]
        if "conversation_id" in header:
            assert list(table["conversation_id"]) == [r["conversation_id"].strip() for r in rows]
        if "split" in header:
            assert list(table["split"]) == [r["split"] for r in rows]
        return
    try:
        read_csv_messages(path)
    except NextwordError as err:
        check_refusal(err, path)
        assert re.search(f": line {line}[:,]", str(err)), (str(err), line)
    else:
        raise AssertionError(f"{defect} on line {line} was read")


def test_a_defect_is_refused_naming_its_line_and_a_clean_file_reads_back(tmp_path):
    tried = fuzz("defects", files_with_one_defect(), tmp_path / "fuzz.csv", check_defect)
    assert tried == EXAMPLES
