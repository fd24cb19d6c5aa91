"""Stage 3: build the vocabulary from the train split only."""

import pandas as pd

from nextword import stage
from nextword.vocab import Vocab


def main(args, params):
    df = pd.read_parquet(args.tokens, columns=["split", "tokens"])
    train = df.loc[df["split"] == "train", "tokens"]
    vocab = Vocab.build(train, params.vocab.min_freq, params.vocab.max_size)
    vocab.save(args.out)
    print(f"{args.out}: {len(vocab)} tokens from {len(train)} train messages")


if __name__ == "__main__":
    stage.run(main, "tokens", "out", description=__doc__)
