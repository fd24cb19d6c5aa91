"""Stage 6: the servable model folder: the trained model, the engine settings, its n-gram and banned words.

Everything that serves the model (the evaluate and sample stages, the CLI, the
web page, the MLflow model) loads this folder and the settings in it, so an
``engine`` param change reruns this stage and what follows it, never training.
With ``engine.backend: onnx`` it also exports the model step the engine runs
(``model.onnx``, or ``model.int8.onnx`` with ``engine.int8``).
"""

import time

import numpy as np

from nextword import stage
from nextword.export import export_servable_step
from nextword.modeldir import write_servable
from nextword.ngram import KneserNey, stream_from_windows
from nextword.vocab import Vocab


def main(args, params):
    engine = params.engine
    ngram = None
    if engine.ngram_order:
        started = time.perf_counter()
        vocab = Vocab.load(args.vocab)
        ngram = KneserNey.fit(stream_from_windows(np.load(f"{args.windows}/train.npy")), len(vocab),
                              engine.ngram_order)
        print(f"the engine's {engine.ngram_order}-gram fitted in {time.perf_counter() - started:.1f} s")
    # With the ONNX backend, the step it runs is written into the folder before the folder appears.
    write_servable(args.out, args.trained, engine, ngram, also=export_servable_step)
    print(f"{args.out}: engine settings {engine.model_dump()}")


if __name__ == "__main__":
    stage.run(main, "trained", "vocab", "windows", "out", description=__doc__)
