"""Baseline: a Kneser-Ney n-gram model fitted on the train stream, scored on val and test like the LSTM.

The two splits are scored side by side, each in a process forked with the fitted model (one NumPy pass
at a time uses one core), with the same figures as one after the other.
"""

import os
import time

import numpy as np
import pandas as pd

from nextword import stage
from nextword.files import write_json
from nextword.forked import forked_map
from nextword.metrics import evaluate_ngram, per_word
from nextword.ngram import KneserNey, stream_from_windows
from nextword.vocab import Vocab
from nextword.windows import table_word_targets


def main(args, params):
    vocab = Vocab.load(args.vocab)
    start = time.perf_counter()
    model = KneserNey.fit(stream_from_windows(np.load(f"{args.windows}/train.npy")), len(vocab),
                          params.baseline.order)
    print(f"order {model.order} fitted in {time.perf_counter() - start:.1f} s; discounts per order "
          + ", ".join("(" + ", ".join(f"{d:.3f}" for d in ds) + ")" for ds in model.discounts))
    messages = pd.read_parquet(args.messages, columns=["split", "speaker", "text"])
    splits = ("val", "test")
    start = time.perf_counter()
    scored = forked_map(_score, (model, vocab), [f"{args.windows}/{split}.npy" for split in splits],
                        os.cpu_count() or 1)
    metrics = dict(zip(splits, scored))
    for split, m in metrics.items():
        m.update(per_word(m, table_word_targets(messages[messages["split"] == split], params.window.speaker_tags)))
        print(f"{split}: perplexity {m['perplexity']:.2f} ({m['word_perplexity']:.2f} per word), "
              f"top-1 {m['top1']:.3f}, top-3 {m['top3']:.3f} ({m['tokens']} tokens)")
    print(f"both splits scored in {time.perf_counter() - start:.0f} s")
    write_json(args.metrics, metrics)


def _score(shared: tuple, windows: str) -> dict:
    model, vocab = shared
    return evaluate_ngram(model, np.load(windows), vocab)


if __name__ == "__main__":
    stage.run(main, "vocab", "windows", "messages", "metrics", description=__doc__)
