"""Stage 8: next-word suggestions and completed lines for the prompts in params, from the servable model folder."""

from nextword import stage
from nextword.engine import Engine
from nextword.files import write_text
from nextword.text import detokenize


def main(args, params):
    s = params.sample
    engine = Engine.load(args.model)
    # (label, strategy, knobs): each sampling knob on its own, so the report shows what each one does.
    rows = [
        ("greedy", "greedy", {}),
        (f"sample, temperature {s.temperature}", "sample", {"temperature": s.temperature}),
        (f"sample, top-k {s.top_k}", "sample", {"top_k": s.top_k}),
        (f"sample, top-p {s.top_p}", "sample", {"top_p": s.top_p}),
        (f"beam, {s.beam_size} beams", "beam", {"beam_size": s.beam_size}),
    ]
    lines = ["# Samples", ""]
    for number, prompt in enumerate(s.prompts, 1):
        session = engine.session()
        partial = session.type_text(prompt.speaker, prompt.text)
        lines += [f"## {number}. {prompt.speaker}: {prompt.text!r}", "", f"Next word (top {s.k}):", ""]
        lines += [f"- {x.word} ({x.probability:.3f})" for x in session.suggest(partial, s.k)]
        lines += ["", "Completions:", ""]
        typed = prompt.text[: len(prompt.text) - len(partial)] if partial else prompt.text.rstrip() + " "
        for label, strategy, knobs in rows:
            words = session.complete(strategy, s.max_words, seed=params.seed + number, prefix=partial, **knobs)
            lines.append(f"- {label}: {typed}**{detokenize(words)}**")
        lines.append("")
    write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    stage.run(main, "model", "out", description=__doc__)
