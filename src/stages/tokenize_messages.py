"""Stage 2: tokenize every message (lowercase words with apostrophes, and . , ! ? ;).

Named tokenize_messages.py, not tokenize.py, so it does not shadow the standard library module.
"""

import pandas as pd

from nextword import stage
from nextword.files import atomic_path
from nextword.text import tokenize


def main(args, params):
    df = pd.read_parquet(args.messages)
    df["tokens"] = [tokenize(t) for t in df["text"]]
    df = df.drop(columns="text")
    with atomic_path(args.out) as tmp:
        df.to_parquet(tmp, index=False)
    print(f"{args.out}: {int(df['tokens'].map(len).sum())} tokens in {len(df)} messages")


if __name__ == "__main__":
    stage.run(main, "messages", "out", description=__doc__)
