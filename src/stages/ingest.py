"""Stage 1: read the chat CSV (or text file) named by data.csv into a table with splits."""

from nextword import stage
from nextword.files import atomic_path
from nextword.messages import load_messages


def main(args, params):
    d = params.data
    df = load_messages(args.csv, d.format, d.split.val, d.split.test, d.block_messages)
    with atomic_path(args.out) as tmp:
        df.to_parquet(tmp, index=False)
    counts = df.groupby("split")["conversation_id"].nunique().to_dict()
    print(f"{args.out}: {len(df)} messages; conversations per split: {counts}")


if __name__ == "__main__":
    stage.run(main, "csv", "out", description=__doc__)
