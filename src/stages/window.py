"""Stage 4: lay each split's conversations end to end and cut windows of window.length + 1 ids."""

import numpy as np
import pandas as pd

from nextword import stage
from nextword.files import atomic_path
from nextword.messages import SPLITS
from nextword.tokenizer import Tokenizer
from nextword.vocab import Vocab
from nextword.windows import cut_windows, split_stream


def main(args, params):
    df = pd.read_parquet(args.tokens)
    vocab = Vocab.load(args.vocab)
    tokenizer = Tokenizer.load(args.tokenizer)
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            part = df[df["split"] == split]
            pieces = tokenizer.pieces_of_messages(part["tokens"])
            stream = split_stream(zip(part["speaker"], pieces), vocab, params.window.speaker_tags)
            windows = cut_windows(stream, params.window.length)
            np.save(tmp / f"{split}.npy", windows)
            print(f"{split}: {len(stream)} tokens, {len(windows)} windows")


if __name__ == "__main__":
    stage.run(main, "tokens", "vocab", "tokenizer", "out", description=__doc__)
