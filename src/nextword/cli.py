"""The ``nextword`` command line: suggest, complete, evaluate, chat, serve, promote, and params."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nextword.config import BACKENDS, SPEAKERS
from nextword.decoding import STRATEGIES
from nextword.errors import NextwordError, exit_on_error

DEFAULT_MODEL = "models/model"  # the bundle stage's output in dvc.yaml (the test suite checks they agree)


class Parser(argparse.ArgumentParser):
    """Usage errors as the one line every other error is: ``error: ...``, exit 2."""

    def error(self, message):
        raise NextwordError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


# Engine flags and the EngineParams field each one overrides; a flag left out keeps the model folder's setting.
ENGINE_FLAGS = {
    "ngram_weight": "ngram_weight",
    "cache_weight": "cache_weight",
    "cache_bigram_weight": "cache_bigram_weight",
    "unknown_weight": "unknown_weight",
    "banned": "banned_words",
    "k": "suggestions",
    "backend": "backend",
}


def engine_overrides(args) -> dict:
    """The engine settings given on the command line, as overrides of the model folder's."""
    overrides = {field: getattr(args, flag) for flag, field in ENGINE_FLAGS.items()
                 if getattr(args, flag, None) is not None}
    if args.show_rejected is not None:
        overrides["skip_rejected"] = not args.show_rejected
    if args.fp32:
        overrides["int8"] = False
    return overrides


def weight(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def ngram_weight(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def load_engine(args, exact_batches: bool = False):
    from nextword.engine import Engine

    return Engine.load(args.model, overrides=engine_overrides(args), exact_batches=exact_batches)


# ----------------------------------------------------------------------------- commands


def cmd_suggest(args) -> None:
    """Print the top-k next words (or completions of the partial last word), one per line with its probability,
    to four significant digits: a word far less likely than the first shows its number (``2.7e-07``), not 0.

    With --right, the cursor is inside the message: TEXT is before it, --right after it, and the words
    from TEXT are rescored with the text after the cursor (fill-in-the-middle)."""
    engine = load_engine(args)
    session = engine.session()
    partial = session.type_text(args.speaker, args.text)
    for suggestion in session.suggest(partial, engine.options.suggestions, right=args.right):
        print(f"{suggestion.word}\t{suggestion.probability:.4g}")


def cmd_complete(args) -> None:
    """Print TEXT extended until the end of the message or --max-words tokens."""
    from nextword.text import PUNCTUATION, detokenize

    session = load_engine(args).session()
    partial = session.type_text(args.speaker, args.text)
    strategy = args.strategy
    words = session.complete(strategy, args.max_words, args.temperature, args.top_k, args.top_p,
                             args.beam_size, seed=args.seed, prefix=partial)
    typed = args.text[: len(args.text) - len(partial)] if partial else args.text.rstrip()
    if typed and not partial and words and words[0] not in PUNCTUATION:
        typed += " "
    print(typed + detokenize(words))


def cmd_evaluate(args) -> None:
    """Perplexity, next-word accuracy, keystroke savings and latency on every message of a CSV;
    with --fim, fill-in-the-middle accuracy and latency instead."""
    from nextword.messages import prepare, read_csv_messages

    table = read_csv_messages(args.csv)
    if args.split:
        if "split" not in table.columns:
            raise NextwordError(f"{args.csv}: no 'split' column to pick the {args.split!r} rows from")
        table = table[table["split"] == args.split]
        if table.empty:
            raise NextwordError(f"{args.csv}: no messages in the {args.split!r} split")
    # No held-out fractions: every message left is scored.
    messages = prepare(table, str(args.csv), 0.0, 0.0)

    import torch  # only once the CSV is known to be good: a bad file fails fast

    from nextword.keystrokes import conversations_from_table, simulate, simulate_batched
    from nextword.metrics import evaluate, per_word
    from nextword.modeldir import load_trained
    from nextword.text import tokenize
    from nextword.tokenizer import Tokenizer
    from nextword.windows import cut_windows, split_stream, word_targets

    conversations = conversations_from_table(messages)[: args.max_conversations]
    engine = load_engine(args)
    if args.fim:
        report_fim(args, engine, conversations)
        return
    threads = args.threads or torch.get_num_threads()

    # Perplexity as the evaluate stage computes it, on the messages' stream cut into windows.
    messages = [(speaker, tokenize(text)) for conversation in conversations for speaker, text in conversation]
    tokenizer = Tokenizer.load(args.model)
    stream = split_stream(((s, tokenizer.pieces(t)) for s, t in messages), engine.vocab, engine.speaker_tags)
    windows = cut_windows(stream, engine.config["window_length"])
    torch.set_num_threads(threads)
    scores = evaluate(load_trained(args.model)[0], windows, engine.vocab)  # the LSTM alone, in float32
    scores.update(per_word(scores, word_targets(messages, engine.speaker_tags)))
    torch.set_num_threads(1)  # latency is measured on one thread
    batched = load_engine(args, exact_batches=True)  # the same int8 weights, a kernel that batches exactly
    keys = simulate_batched(batched, conversations, k=engine.options.suggestions, processes=os.cpu_count() or 1)
    timed = simulate(engine, conversations, k=engine.options.suggestions, max_conversations=args.latency_conversations)
    latency = {name: getattr(timed, name) for name in ("latency_p50_ms", "latency_p99_ms", "cpu_p50_ms", "cpu_p99_ms",
                                                        "latency_keystrokes")}

    result = {
        "csv": str(args.csv),
        "model": str(args.model),
        "engine": engine.options.model_dump(exclude={"ngram_order", "banned_words"}),
        "conversations": keys.conversations,
        "messages": keys.messages,
        "perplexity": scores["perplexity"],
        "nll": scores["nll"],
        "tokens": scores["tokens"],
        "word_perplexity": scores["word_perplexity"],
        **{name: value for name, value in keys.to_dict().items() if name not in ("conversations", "messages")},
        **latency,
        "latency_conversations": timed.conversations,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['csv']}: {keys.conversations} conversations, {keys.messages} messages, {keys.words} words")
    print(f"perplexity      {scores['perplexity']:.2f} (the LSTM; nll {scores['nll']:.4f} over {scores['tokens']} "
          f"tokens), {scores['word_perplexity']:.2f} per word")
    print(f"top-1 / top-3   {keys.top1:.3f} / {keys.top3:.3f}")
    print(f"keystrokes      {keys.keystrokes} of {keys.keystrokes_without}: KSR {keys.ksr:.2%} "
          f"({engine.options.suggestions} suggestions); words passed over shown again "
          f"{keys.ksr_show_rejected:.2%}, skipped {keys.ksr_skip_rejected:.2%}")
    print(f"latency         p50 {timed.latency_p50_ms:.3f} ms, p99 {timed.latency_p99_ms:.3f} ms per keystroke "
          f"({timed.latency_keystrokes} keystrokes of the first {timed.conversations} conversations, one at a time "
          f"on one thread; CPU time p50 {timed.cpu_p50_ms:.3f}, p99 {timed.cpu_p99_ms:.3f} ms)")


def report_fim(args, engine, conversations) -> None:
    """Print the fill-in-the-middle figures (:mod:`nextword.fim`) of ``engine`` on ``conversations``."""
    import torch

    from nextword.fim import evaluate_fim

    torch.set_num_threads(1)  # latency is measured on one thread
    k = engine.options.suggestions
    report = evaluate_fim(engine, conversations, args.fim_messages, k=k)
    if args.json:
        print(json.dumps({"csv": str(args.csv), "model": str(args.model), "k": k, **report.to_dict()}, indent=2))
        return
    print(f"{args.csv}: {report.messages} messages, one middle word removed from each "
          f"({report.oov} outside the vocabulary)")
    print(f"left context    top-1 {report.top1_left:.3f}, top-{k} {report.top3_left:.3f}")
    print(f"with the right  top-1 {report.top1:.3f}, top-{k} {report.top3:.3f} "
          f"({report.candidates} candidates rescored with up to {report.right_tokens} tokens on the right)")
    print(f"latency         p50 {report.latency_p50_ms:.3f} ms, p99 {report.latency_p99_ms:.3f} ms per suggestion "
          f"with the right context (one thread; CPU time p50 {report.cpu_p50_ms:.3f}, p99 {report.cpu_p99_ms:.3f} ms)")


def cmd_chat(args) -> None:
    """Type a conversation; suggestions show below the line as you type, Tab accepts the first."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise NextwordError("nextword chat needs a terminal")
    engine = load_engine(args)
    run_chat(engine, args.speaker, engine.options.suggestions, alternate=not args.one_speaker)


def run_chat(engine, speaker: str, k: int, alternate: bool = True) -> None:
    """The terminal loop: one prompt per message, the suggestion strip as its bottom toolbar.

    The message being typed is handed to the session on every keystroke;
    the session commits only the words that are new, so a letter costs a
    prefix lookup and a finished word one model step.
    """
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    from nextword.text import is_word, tokenize

    session = engine.session()
    current = {"speaker": speaker}
    counts = {"messages": 0, "words": 0, "accepted": 0}

    def shown(text: str):
        partial = session.type_text(current["speaker"], text)
        return partial, session.suggest(partial, k, typing=True)

    keys = KeyBindings()

    @keys.add("tab")
    def accept(event):
        buffer = event.current_buffer
        text = buffer.document.text_before_cursor
        partial, suggestions = shown(text)
        if suggestions and text.lower().endswith(partial):
            buffer.delete_before_cursor(len(partial))
            buffer.insert_text(suggestions[0].word + " ")
            counts["accepted"] += 1

    def toolbar():
        _, suggestions = shown(prompt.default_buffer.document.text_before_cursor)
        return " [Tab] " + " | ".join(s.word for s in suggestions) if suggestions else " (no suggestion)"

    prompt = PromptSession(key_bindings=keys, bottom_toolbar=toolbar)
    print("Type a message and press Enter; Tab accepts the first suggestion; Ctrl-D quits.")
    while True:
        try:
            text = prompt.prompt(f"{current['speaker']}> ")
        except (EOFError, KeyboardInterrupt):
            break
        if not tokenize(text):
            session.discard_draft()
            continue
        session.type_text(current["speaker"], text)
        session.send()
        counts["messages"] += 1
        counts["words"] += sum(is_word(t) for t in tokenize(text))
        if alternate:
            current["speaker"] = "agent" if current["speaker"] == "user" else "user"
    words = counts["words"]
    rate = f" ({counts['accepted'] / words:.0%} of the words)" if words else ""
    print(f"messages: {counts['messages']}, words: {words}, suggestions accepted: {counts['accepted']}{rate}")


def cmd_serve(args) -> None:
    """Start the web demo on HOST:PORT."""
    try:
        from nextword.server import serve
    except ImportError as err:
        raise NextwordError(f"the web demo is not available: {err}") from None
    if not Path(args.model).is_dir():
        raise NextwordError(f"{args.model}: no such model folder; run the pipeline or pass --model")
    if args.workers < 1:
        raise NextwordError(f"--workers must be at least 1, not {args.workers}")
    kwargs = {"log_path": args.log} if args.log else {}
    serve(args.model, host=args.host, port=args.port, overrides=engine_overrides(args), workers=args.workers,
          **kwargs)


def cmd_params(args) -> None:
    """Compose params.yaml from conf/ with a preset and overrides, exactly as `dvc exp run -S` does."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    conf = Path(args.conf).resolve()
    if not (conf / "config.yaml").exists():
        raise NextwordError(f"{conf}: no config.yaml; run this from the project root")
    from nextword.config import load_params
    from nextword.files import atomic_path

    with atomic_path(args.out) as tmp:
        try:
            compose_and_dump(tmp, str(conf), None, "config", "", [f"corpus={args.preset}", *args.overrides])
        except HydraException as err:
            raise NextwordError(f"{args.out}: {str(err).splitlines()[0]}") from None
        load_params(tmp, args.out)  # refuse a composition that the stages would refuse
    print(f"{args.out}: preset {args.preset}{' with ' + ' '.join(args.overrides) if args.overrides else ''}")


def cmd_promote(args) -> None:
    """Move @champion to @challenger when the challenger's test KSR beats the champion's on the same test data."""
    from nextword.tracking import promote

    print(promote(force=args.force))


def cmd_export(args) -> None:
    """Write the model step as an ONNX graph and print one JSON object: its size and, with --check-csv,
    how the engine on it compares with the engine on PyTorch while typing the CSV's messages."""
    conversations = None
    if args.check_csv:  # read first, so that a bad file fails before the export
        from nextword.keystrokes import conversations_from_table
        from nextword.messages import prepare, read_csv_messages

        table = prepare(read_csv_messages(args.check_csv), str(args.check_csv), 0.0, 0.0)
        conversations = conversations_from_table(table)[: args.max_conversations]

    from nextword.export import export_onnx
    from nextword.modeldir import load_trained, onnx_file

    model = load_trained(args.model)[0]
    out = Path(args.out) if args.out else onnx_file(args.model, args.int8)
    size = export_onnx(model, out, int8=args.int8, fp16=args.fp16)
    result = {"format": args.format, "model": str(args.model), "out": str(out), "int8": args.int8,
              "fp16": args.fp16, "bytes": size, "megabytes": round(size / 1e6, 2)}
    if conversations is not None:
        result["check"] = {"csv": str(args.check_csv), **check_export(args.model, out, args.int8, conversations)}
    print(json.dumps(result, indent=2))


def check_export(model_dir, onnx, int8: bool, conversations) -> dict:
    """The engine on the ONNX graph against the engine on PyTorch, typing ``conversations`` with the folder's settings.

    The reference is PyTorch with the weights the graph holds: with ``int8``, the int8 kernel that the evaluate
    stage scores (``Engine.load(exact_batches=True)``), whose arithmetic the graph computes; else float32.
    The top suggestions and keystroke savings are compared with it, and with ``int8`` the top suggestions
    with float32 too, the model as trained. Latency is compared with the PyTorch engine as served
    (int8 on one stream runs PyTorch's fused kernel, :func:`nextword.quantize.fused_int8`).
    """
    from nextword.engine import Engine
    from nextword.keystrokes import agreement, simulate

    torch_engine = {"backend": "torch", "int8": int8}
    served = Engine.load(model_dir, overrides=torch_engine)
    reference = Engine.load(model_dir, overrides=torch_engine, exact_batches=True) if int8 else served
    exported = Engine.load(model_dir, overrides={"backend": "onnx", "int8": int8}, onnx=onnx)
    k = served.options.suggestions
    agree = agreement(reference, exported, conversations, k)
    engines = {"torch": reference, "onnx": exported} | ({"torch_served": served} if int8 else {})
    keys = {name: simulate(engine, conversations, k) for name, engine in engines.items()}
    result = {
        "engine": served.options.model_dump(exclude={"ngram_order", "banned_words", "backend"}),
        "conversations": keys["torch"].conversations,
        "messages": keys["torch"].messages,
        "words": keys["torch"].words,
        "top1_agreement": agree.top1,  # with PyTorch on the same weights: the evaluated int8 kernel, or float32
        "agreement_keystrokes": agree.keystrokes,
        "max_prob_difference": agree.max_prob_difference,
    }
    if int8:
        as_trained = agreement(Engine.load(model_dir, overrides={"backend": "torch", "int8": False}), exported,
                               conversations, k)
        result |= {"top1_agreement_float32": as_trained.top1,
                   "max_prob_difference_float32": as_trained.max_prob_difference}
    return result | {
        "ksr": {name: report.ksr for name, report in keys.items()},
        "ksr_difference_points": 100 * (keys["onnx"].ksr - keys["torch"].ksr),
        # per keystroke on one thread, wall-clock and the thread's CPU time, over the keystrokes each one timed
        "latency_ms": {name: {"p50": r.latency_p50_ms, "p99": r.latency_p99_ms, "cpu_p50": r.cpu_p50_ms,
                              "cpu_p99": r.cpu_p99_ms, "keystrokes": r.latency_keystrokes}
                       for name, r in keys.items()},
    }


# ----------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nextword", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, speaker=True, k=True):
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model folder (default {DEFAULT_MODEL}), or a registered model such as "
                            "models:/nextword@champion")
        engine = p.add_argument_group(
            "engine settings", "each defaults to the setting the pipeline evaluated, stored in the model folder")
        engine.add_argument("--banned", metavar="FILE", help="banned-word list, one word per line")
        engine.add_argument("--ngram-weight", type=ngram_weight, metavar="W",
                            help="weight of the n-gram in the mix (0: off; 1: the n-gram alone, a baseline)")
        engine.add_argument("--cache-weight", type=weight, metavar="W", help="weight of the conversation's word cache")
        engine.add_argument("--cache-bigram-weight", type=weight, metavar="W",
                            help="weight of the words that followed the last word earlier in the conversation")
        engine.add_argument("--unknown-weight", type=ngram_weight, metavar="W",
                            help="share of the <UNK> probability that ranks the conversation's own words outside "
                                 "the vocabulary among the others (0: they only fill free slots)")
        shown = engine.add_mutually_exclusive_group()
        shown.add_argument("--show-rejected", dest="show_rejected", action="store_true", default=None,
                           help="while typing (chat, evaluate, serve), show again the words already shown for this word")
        shown.add_argument("--skip-rejected", dest="show_rejected", action="store_false",
                           help="while typing, leave out the words already shown for this word")
        engine.add_argument("--fp32", action="store_true", help="float32 weights instead of int8")
        engine.add_argument("--backend", choices=BACKENDS,
                            help="what runs the model step: PyTorch, or the folder's ONNX export in ONNX Runtime")
        if k:
            engine.add_argument("-k", type=positive_int, help="how many suggestions")
        if speaker:
            p.add_argument("--speaker", choices=SPEAKERS, default="user")

    p = sub.add_parser("suggest", help="next-word suggestions for TEXT", description=cmd_suggest.__doc__)
    model_args(p)
    p.add_argument("text", metavar="TEXT",
                   help="the message typed so far; without a trailing space its last word is completed")
    p.add_argument("--right", default="", metavar="TEXT",
                   help="the text after the cursor, when it is inside the message: suggestions fit both sides")
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser("complete", help="complete the line TEXT", description=cmd_complete.__doc__)
    model_args(p, k=False)
    p.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sample: below 1 sharper, above 1 flatter")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="sample: only the K most probable (0: all)")
    p.add_argument("--top-p", type=probability, default=1.0, help="sample: only the nucleus of mass P (1: all)")
    p.add_argument("--beam-size", type=positive_int, default=4)
    p.add_argument("--max-words", type=positive_int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("text", metavar="TEXT")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("evaluate", help="perplexity, accuracy, keystroke savings and latency on a CSV",
                       description=cmd_evaluate.__doc__)
    model_args(p, speaker=False)
    p.add_argument("--csv", required=True, help="messages: speaker, text, optional conversation_id and turn")
    p.add_argument("--split", choices=("train", "val", "test"), help="only the rows of this split (a 'split' column)")
    p.add_argument("--max-conversations", type=positive_int, help="only the first N conversations")
    p.add_argument("--latency-conversations", type=positive_int, default=20,
                   help="time the keystrokes of the first N conversations, typed one at a time (default: 20)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="threads for perplexity (0: default)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--fim", action="store_true",
                   help="instead: fill-in-the-middle, restoring a word removed from the middle of messages, "
                        "with and without the text on its right")
    p.add_argument("--fim-messages", type=positive_int, default=2000, metavar="N",
                   help="with --fim, test the first N messages that have a middle word (default 2000)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("chat", help="type a conversation with suggestions; Tab accepts", description=cmd_chat.__doc__)
    model_args(p)
    p.add_argument("--one-speaker", action="store_true", help="every message from --speaker (default: alternate)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="the web demo on 127.0.0.1", description=cmd_serve.__doc__)
    model_args(p, speaker=False)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log", metavar="FILE", help="keystroke log (JSONL)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes answering on the port, each with its own copy of the model (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="the model step as an ONNX graph, checked against PyTorch",
                       description=cmd_export.__doc__)
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder (default {DEFAULT_MODEL})")
    p.add_argument("--out", metavar="FILE",
                   help="where to write it (default: in the model folder, model.onnx or model.int8.onnx, "
                        "where engine.backend onnx reads it)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--int8", action="store_true",
                         help="int8 weights, the engine's own int8 arithmetic (the kernel the evaluate stage scores)")
    weights.add_argument("--fp16", action="store_true",
                         help="float16 weights, the embedding in 8 bits (a scale per 32 weights), computed in "
                              "float32: closer to the float32 model than --int8, slower; written where the float32 "
                              "graph goes")
    p.add_argument("--check-csv", metavar="CSV",
                   help="type these messages (speaker, text, optional conversation_id) on both backends and "
                        "report top-1 agreement, keystroke savings and latency")
    p.add_argument("--max-conversations", type=positive_int, help="only the CSV's first N conversations")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("params", help="write params.yaml from conf/ for a preset (toy or chat)",
                       description=cmd_params.__doc__)
    p.add_argument("preset", nargs="?", default="chat")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.layers=2")
    p.add_argument("--conf", default="conf")
    p.add_argument("--out", default="params.yaml")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("promote", help="make the registry's @challenger the @champion if it is better",
                       description=cmd_promote.__doc__)
    p.add_argument("--force", action="store_true", help="promote even if it is not better")
    p.set_defaults(func=cmd_promote)
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None):
        from nextword.tracking import resolve_model

        args.model = str(resolve_model(args.model))
    args.func(args)


if __name__ == "__main__":
    main()
