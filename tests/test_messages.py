"""Reading chat CSVs: splits by conversation, and bad input refused in one line with nothing left behind."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from nextword.errors import NextwordError
from nextword.messages import assign_splits, load_messages, read_csv_messages

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_no_conversation_in_two_splits_and_stable_when_rows_are_added(tmp_path):
    rows = [(f"c{i}", t, "user" if t % 2 == 0 else "agent", f"message {t} of {i}") for i in range(300) for t in range(3)]
    df = pd.DataFrame(rows, columns=["conversation_id", "turn", "speaker", "text"])
    path = tmp_path / "chat.csv"
    df.to_csv(path, index=False)
    first = load_messages(path, "csv", 0.1, 0.1)
    assert first.groupby("conversation_id")["split"].nunique().max() == 1
    counts = first.drop_duplicates("conversation_id")["split"].value_counts()
    assert set(counts.index) == {"train", "val", "test"} and counts["train"] > counts["val"]
    # adding conversations never moves an old one
    more = pd.concat([df, pd.DataFrame([(f"new{i}", 0, "user", "hello") for i in range(50)], columns=df.columns)])
    more.to_csv(path, index=False)
    second = load_messages(path, "csv", 0.1, 0.1)
    old = second[~second["conversation_id"].str.startswith("new")]
    assert old.drop_duplicates("conversation_id").set_index("conversation_id")["split"].equals(
        first.drop_duplicates("conversation_id").set_index("conversation_id")["split"])


def test_split_fractions_follow_params():
    ids = pd.Series([f"conv-{i}" for i in range(5000)])
    split = assign_splits(ids, 0.2, 0.1).value_counts(normalize=True)
    assert abs(split["val"] - 0.2) < 0.03 and abs(split["test"] - 0.1) < 0.03


def test_optional_columns_bom_crlf_quoted_newlines_and_blank_messages(tmp_path):
    path = write(tmp_path / "c.csv", b'\xef\xbb\xbfSpeaker,text\r\nuser,"hi,\r\nthere"\r\nAGENT,   \r\nagent,ok\r\n')
    df = load_messages(path, "csv", 0.0, 0.0)
    assert list(df["text"]) == ["hi,\r\nthere", "ok"]  # the blank message is skipped
    assert list(df["speaker"]) == ["user", "agent"] and list(df["turn"]) == [0, 2]
    assert (df["split"] == "train").all()


def test_rows_without_conversation_id_form_blocks(tmp_path):
    path = write(tmp_path / "c.csv", "speaker,text\n" + "".join(f"user,m{i}\n" for i in range(5)))
    df = read_csv_messages(path, block_messages=2)
    assert list(df["conversation_id"]) == ["block-0", "block-0", "block-1", "block-1", "block-2"]


def test_explicit_split_column_is_kept(tmp_path):
    path = write(tmp_path / "c.csv", "speaker,text,split\nuser,a b,train\nuser,c d,test\n")
    assert list(load_messages(path, "csv", 0.5, 0.4)["split"]) == ["train", "test"]


BAD_INPUTS = {
    "no_text_column": ("speaker,message\nuser,hi\n", "no 'text' column"),
    "empty": ("", "file is empty"),
    "header_only": ("speaker,text\n", "no data rows"),
    "ragged": ("speaker,text\nuser,hi\nuser,hi,extra\n", "line 3: expected 2 fields, saw 3"),
    # pandas would take the extra leading fields as an index
    "more_fields_than_header": ("speaker,text\nuser,hi,extra\nagent,ok,more\n", "line 2: expected 2 fields, saw 3"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary data"),
    "latin1": (b"speaker,text\nuser,caf\xe9\n", "not UTF-8"),
    "semicolons": ("speaker;text\nuser;hi\n", "semicolon-separated"),
    "bad_speaker": ("speaker,text\nuser,hi\nbot,hello\n", "line 3, column 'speaker'"),
    "no_tokens": ("speaker,text\nuser,:-)\nagent,---\n", "no message has any word"),
    # Past the first 64 KiB, and lines counted as an editor counts them
    "nul_late": (b"speaker,text\n" + b"user,hi\n" * 10000 + b"user,a\x00b\n", "line 10002: binary data"),
    "latin1_late": (b"speaker,text\n" + b"user,hi\n" * 10000 + b"user,caf\xe9\n", "line 10002: not UTF-8"),
    "ragged_after_quoted_newline": ('speaker,text\nuser,"two\nlines"\n\nuser,hi,extra\n',
                                    "line 5: expected 2 fields"),
    "lone_cr_line_ends": ("speaker,text\ruser,hi\rbot,x\r", "line 3, column 'speaker'"),
    "leading_blank_lines": ("\n\nspeaker,text\nuser,hi,extra\n", "line 4: expected 2 fields"),
    "quote_never_closed": ('speaker,text\nuser,hi\nuser,"open\nagent,bye\n', "line 3: a quoted field is never closed"),
    "duplicate_column": ("speaker,text,Text \nuser,a,b\n", "line 1: columns 2 and 3 are both named 'text'"),
    "turn_not_whole": ("speaker,text,turn\nuser,hi,0\nuser,hi,inf\n", "line 3, column 'turn': 'inf'"),
    "turn_too_big": ("speaker,text,turn\nuser,hi,99999999999999999999\n", "line 2, column 'turn'"),
    "blank_conversation_id": ("conversation_id,speaker,text\nc1,user,hi\n ,agent,yo\n",
                              "line 3, column 'conversation_id'"),
    "bad_split": ("speaker,text,split\nuser,hi,dev\n", "line 2, column 'split': 'dev'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_csv_is_refused_by_the_library(tmp_path, case):
    data, message = BAD_INPUTS[case]
    path = write(tmp_path / f"{case}.csv", data)
    with pytest.raises(NextwordError, match=message) as err:
        load_messages(path, "csv", 0.1, 0.1)
    assert str(path) in str(err.value)


def test_decisions_where_the_file_is_silent(tmp_path):
    # blank lines before the header, a column with no name, a row of empty fields, a row without its text
    path = write(tmp_path / "c.csv", "\n \n Speaker ,text,,notes\nuser,NA,x,\n,,,\nagent\nAGENT , 00123 ,,n\n")
    df = read_csv_messages(path)
    assert list(df["speaker"]) == ["user", "agent", "agent"] and list(df["text"]) == ["NA", "", " 00123 "]
    path = write(tmp_path / "t.csv", "speaker,text,turn\nuser,a,3.0\nagent,b,-1\nuser,c,+000000000000000000000042\n")
    assert list(read_csv_messages(path)["turn"]) == [3, -1, 42]


def test_folder_and_unreadable_file_are_refused(tmp_path, monkeypatch):
    with pytest.raises(NextwordError, match="is a folder"):
        read_csv_messages(tmp_path)
    path = write(tmp_path / "c.csv", "speaker,text\nuser,hi\n")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # a chmod does not stop root, who may run the tests
    with pytest.raises(NextwordError, match="c.csv: permission denied"):
        read_csv_messages(path)


def run_ingest(tmp_path, csv: Path):
    out = tmp_path / "out" / "messages.parquet"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src/stages/ingest.py"), "--params", str(ROOT / "params.yaml"),
         "--csv", str(csv), "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    return proc, out


@pytest.mark.parametrize("case", ["ragged", "more_fields_than_header", "binary", "no_text_column", "no_tokens"])
def test_ingest_stage_fails_in_one_line_and_writes_nothing(tmp_path, case):
    data, message = BAD_INPUTS[case]
    csv = write(tmp_path / f"{case}.csv", data)
    proc, out = run_ingest(tmp_path, csv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(csv) in lines[0] and message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == []


def test_ingest_stage_missing_file(tmp_path):
    proc, out = run_ingest(tmp_path, tmp_path / "nope.csv")
    assert proc.returncode == 2 and "nope.csv: file not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_ingest_stage_keeps_the_old_output_when_the_new_input_is_bad(tmp_path):
    good = write(tmp_path / "good.csv", "speaker,text\nuser,hello there\n")
    proc, out = run_ingest(tmp_path, good)
    assert proc.returncode == 0, proc.stderr
    before = out.read_bytes()
    proc, _ = run_ingest(tmp_path, write(tmp_path / "bad.csv", "speaker,text\n"))
    assert proc.returncode == 2
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["messages.parquet"]


def test_text_format_file_and_folder(tmp_path):
    path = write(tmp_path / "corpus.txt", "first line here\n\n = heading = \nthird line\n")
    df = load_messages(path, "text", 0.0, 0.0)
    assert list(df["text"]) == ["first line here", " = heading = ", "third line"]  # the blank line is skipped
    assert df["conversation_id"].is_unique and (df["speaker"] == "user").all()
    folder = tmp_path / "wiki"
    folder.mkdir()
    for name, text in (("train.txt", "a b\nc d\n"), ("valid.txt", "e f\n"), ("test.txt", "g h\n")):
        write(folder / name, text)
    df = load_messages(folder, "text", 0.1, 0.1)
    assert list(df["split"]) == ["train", "train", "val", "test"]
    (folder / "test.txt").unlink()
    with pytest.raises(NextwordError, match="test.txt is missing"):
        load_messages(folder, "text", 0.1, 0.1)
