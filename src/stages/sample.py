"""Stage 7: next-word suggestions and completed lines for the prompts in params."""

from nextword import stage, tracking
from nextword.engine import Engine
from nextword.files import write_text
from nextword.text import detokenize

STRATEGIES = ("greedy", "temperature", "top_k", "top_p", "beam")


def main(args, params):
    tracking.connect()
    s = params.sample
    engine = Engine.load(args.model, args.banned, params.engine)
    lines = ["# Samples", ""]
    for number, prompt in enumerate(s.prompts, 1):
        session = engine.session()
        partial = session.type_text(prompt.speaker, prompt.text)
        lines += [f"## {number}. {prompt.speaker}: {prompt.text!r}", "", f"Next word (top {s.k}):", ""]
        lines += [f"- {x.word} ({x.probability:.3f})" for x in session.suggest(partial, s.k)]
        lines += ["", "Completions:", ""]
        for strategy in STRATEGIES:
            words = session.complete(strategy, s.max_words, s.temperature, s.top_k if strategy == "top_k" else 0,
                                     s.top_p if strategy == "top_p" else 1.0, s.beam_size, seed=params.seed + number,
                                     prefix=partial)
            typed = prompt.text[: len(prompt.text) - len(partial)] if partial else prompt.text.rstrip() + " "
            lines.append(f"- {strategy}: {typed}**{detokenize(words)}**")
        lines.append("")
    write_text(args.out, "\n".join(lines))
    with tracking.resume_run(args.run) as mlflow:
        mlflow.log_artifact(args.out, "reports")
    print("\n".join(lines))


if __name__ == "__main__":
    stage.run(main, "model", "banned", "run", "out", description=__doc__)
