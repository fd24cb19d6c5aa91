"""Stage 3: the tokenizer and the vocabulary, from the train split only.

With ``tokenizer.kind: word`` the vocabulary is the six specials, then the words by count;
with ``sentencepiece`` a SentencePiece model is trained on the train split's word tokens and
the vocabulary is its pieces (see ``nextword.tokenizer``).
"""

import pandas as pd

from nextword import stage
from nextword.files import atomic_path
from nextword.tokenizer import WORD, train
from nextword.vocab import Vocab


def main(args, params):
    df = pd.read_parquet(args.tokens, columns=["split", "tokens"])
    train_tokens = [list(t) for t in df.loc[df["split"] == "train", "tokens"]]
    tokenizer = train(train_tokens, params.tokenizer, params.seed)
    if tokenizer.kind == WORD:
        vocab = Vocab.build(train_tokens, params.vocab.min_freq, params.vocab.max_size)
    else:
        vocab = tokenizer.vocab(train_tokens)
    with atomic_path(args.tokenizer) as tmp:
        tmp.mkdir()
        tokenizer.save(tmp)
    vocab.save(args.out)
    print(f"{args.out}: {len(vocab)} {tokenizer.kind} tokens from {len(train_tokens)} train messages")


if __name__ == "__main__":
    stage.run(main, "tokens", "tokenizer", "out", description=__doc__)
