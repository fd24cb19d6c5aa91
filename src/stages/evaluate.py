"""Stage 7: perplexity, next-word accuracy and keystroke savings of the servable model folder, as DVC metrics.

``reports/metrics.json`` holds what is reproducible: perplexity per token and
per word (comparable across tokenizers, see ``nextword.metrics``) and top-1/top-3
on validation and test (validation as the train stage scored the weights it kept,
with the same function and batch size, on the device it trained on: it is not
scored twice), and the keystroke savings rate (KSR) with
``engine.suggestions`` suggestions on the first ``evaluate.ksr_conversations``
test conversations (0: all), typed through the engine with the settings stored
in the model folder, also with and without ``skip_rejected`` (see
``nextword.keystrokes``); many conversations are typed at once, with the
engine's batch-exact int8 kernel (``nextword.quantize``), for the counts one
stream at a time would give; and, on the same conversations, the share of
words outside the word vocabulary (``vocab.*`` on the train split) and how
many of those the engine completes (``nextword.oov``, counted by the same
simulation), which only a subword model can; and the model's size: its
parameters and the bytes of the model folder as served. Keystroke latency
depends on the machine, so it goes to ``reports/latency.json``, not into the
metrics that `dvc exp show` compares: it is timed on one stream and one
thread, typing the first ``evaluate.latency_conversations`` test
conversations as a keyboard would. The track stage logs both to MLflow.

``reports/engine_parts.csv`` (a DVC plot) is the KSR as each part of the engine
is added to the LSTM, on the first ``evaluate.ablation_conversations`` test
conversations, with the other settings as served.
"""

import csv
import io
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from nextword import stage
from nextword.engine import Engine
from nextword.files import write_json, write_text
from nextword.keystrokes import simulate, simulate_batched, simulate_mixes
from nextword.metrics import evaluate, per_word
from nextword.modeldir import load_trained
from nextword.oov import OovReport
from nextword.text import tokenize
from nextword.vocab import Vocab
from nextword.windows import table_word_targets


# The engine's parts in the order they are added to the LSTM: (label, the settings still off).
ENGINE_PARTS = (
    ("LSTM", {"ngram_weight": 0.0, "cache_weight": 0.0, "cache_bigram_weight": 0.0, "unknown_weight": 0.0}),
    ("+ n-gram", {"cache_weight": 0.0, "cache_bigram_weight": 0.0, "unknown_weight": 0.0}),
    ("+ word cache", {"cache_bigram_weight": 0.0, "unknown_weight": 0.0}),
    ("+ bigram cache", {"unknown_weight": 0.0}),
    ("+ its words outside the vocabulary", {}),
)


def engine_parts(engine: Engine, test: pd.DataFrame, conversations: int) -> str:
    """CSV of the KSR with each engine part added, both with and without skip_rejected (the model run once)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["part", "ksr_show_rejected", "ksr_skip_rejected", "conversations"])
    parts = simulate_mixes(engine, [off for _, off in ENGINE_PARTS], test, k=engine.options.suggestions,
                           max_conversations=conversations or None, processes=os.cpu_count() or 1)
    for (label, _), r in zip(ENGINE_PARTS, parts):
        writer.writerow([label, f"{r.ksr_show_rejected:.5f}", f"{r.ksr_skip_rejected:.5f}", r.conversations])
        print(f"engine parts: {label}: KSR {r.ksr_show_rejected:.4f} (skipping words passed over "
              f"{r.ksr_skip_rejected:.4f})")
    return out.getvalue()


def main(args, params):
    model, vocab, config = load_trained(args.model)
    messages = pd.read_parquet(args.messages)
    metrics, seconds, start = {}, {}, time.perf_counter()

    def lap(part: str) -> None:  # the wall time of each part, printed at the end
        nonlocal start
        now = time.perf_counter()
        seconds[part], start = now - start, now

    for split in ("val", "test"):
        if split == "val" and config.get("validation"):  # training scored these weights on it
            metrics[split] = dict(config["validation"])
        else:
            metrics[split] = evaluate(model, np.load(f"{args.windows}/{split}.npy"), vocab, params.evaluate.batch_size)
        words = table_word_targets(messages[messages["split"] == split], config["speaker_tags"])
        metrics[split].update(per_word(metrics[split], words))
    lap("perplexity")

    e = params.evaluate
    test = messages[messages["split"] == "test"]
    engine = Engine.load(args.model, exact_batches=True)
    k = engine.options.suggestions
    # The word vocabulary the vocab params give on the train split, whatever the model's tokenizer.
    train_words = map(tokenize, messages.loc[messages["split"] == "train", "text"])
    vocabulary = Vocab.build(train_words, params.vocab.min_freq, params.vocab.max_size).index
    savings = simulate_batched(engine, test, k=k, max_conversations=e.ksr_conversations or None,
                               processes=os.cpu_count() or 1, vocabulary=vocabulary)
    metrics["keystrokes"] = {name: getattr(savings, name) for name in (
        "conversations", "words", "ksr", "ksr_show_rejected", "ksr_skip_rejected", "top1", "top3")}
    metrics["oov"] = OovReport.from_savings(savings).to_dict()
    lap("keystrokes")
    metrics["size"] = {"parameters": sum(p.numel() for p in model.parameters()),
                       "folder_bytes": sum(f.stat().st_size for f in Path(args.model).rglob("*") if f.is_file())}
    served = Engine.load(args.model)  # the served step, timed as a keyboard types: one stream, one thread
    timed = simulate(served, test, k=k, max_conversations=e.latency_conversations)
    latency = {name: getattr(timed, name) for name in ("latency_p50_ms", "latency_p99_ms", "cpu_p50_ms", "cpu_p99_ms",
                                                        "latency_keystrokes")}
    latency["latency_conversations"] = timed.conversations
    lap("latency")
    parts = engine_parts(engine, test, e.ablation_conversations)
    lap("engine parts")
    # Written together, once everything is measured: a failure before leaves none of this run's outputs.
    write_json(args.metrics, metrics)
    write_json(args.latency, latency)
    write_text(args.parts, parts)
    for split in ("val", "test"):
        m = metrics[split]
        print(f"lstm {split}: perplexity {m['perplexity']:.2f} per token, {m['word_perplexity']:.2f} per word, "
              f"top-1 {m['top1']:.3f}, top-3 {m['top3']:.3f}")
    keys = metrics["keystrokes"]
    print(f"keystrokes: KSR {keys['ksr']:.3f} over {keys['words']} words of {keys['conversations']} test "
          f"conversations (engine {engine.options.model_dump(exclude={'banned_words'})}), latency p50 "
          f"{latency['latency_p50_ms']:.2f} ms, p99 {latency['latency_p99_ms']:.2f} ms "
          f"(the first {timed.conversations}, one at a time)")
    o = metrics["oov"]
    print(f"out of the word vocabulary: {o['oov_words']} of {o['words']} test words ({o['oov_rate']:.3f}), "
          f"{o['completed']} of them completed by the engine ({o['completed_share']:.3f})")
    print("evaluate took " + ", ".join(f"{part} {s:.0f} s" for part, s in seconds.items()))


if __name__ == "__main__":
    stage.run(main, "model", "windows", "messages", "metrics", "latency", "parts", description=__doc__)
