"""The suggestion engine as an MLflow pyfunc model, for ``mlflow models serve``.

Input: a DataFrame with a ``text`` column (the message typed so far; without a
trailing space its last word is completed), an optional ``speaker`` column
(``user`` or ``agent``, default ``user``), an optional ``k`` column
(default 3) and an optional ``right`` column (the text after the cursor when
it is inside the message: the suggestions then fit both sides). Output: one row per input row with ``suggestions`` (words, most
probable first) and ``probabilities``.

The servable model folder (weights as a state dict, vocabulary and config as
JSON, and the engine settings, n-gram and banned words the pipeline evaluated
with) is stored as an artifact and loaded with :meth:`Engine.load` in
``load_context``, so the MLflow model suggests exactly as the evaluated engine. Nothing is pickled: the model is logged as code (MLflow's
"models from code"), this file being the code, with the ``nextword`` package
shipped beside it.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

import nextword

DEFAULT_K = 3

SIGNATURE = ModelSignature(
    inputs=Schema([
        ColSpec(DataType.string, "text"),
        ColSpec(DataType.string, "speaker", required=False),
        ColSpec(DataType.long, "k", required=False),
        ColSpec(DataType.string, "right", required=False),
    ]),
    outputs=Schema([
        ColSpec(Array(DataType.string), "suggestions"),
        ColSpec(Array(DataType.double), "probabilities"),
    ]),
)


class Suggester(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from nextword.engine import Engine

        self.engine = Engine.load(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = []
        for row in model_input.to_dict("records"):
            speaker = row.get("speaker")
            k = row.get("k")
            right = row.get("right")
            session = self.engine.session()
            partial = session.type_text(speaker if isinstance(speaker, str) and speaker else "user", str(row["text"]))
            suggestions = session.suggest(partial, int(k) if k is not None and not pd.isna(k) else DEFAULT_K,
                                          right=right if isinstance(right, str) else "")
            rows.append({"suggestions": [s.word for s in suggestions],
                         "probabilities": [s.probability for s in suggestions]})
        return pd.DataFrame(rows, columns=["suggestions", "probabilities"])


def requirements(model_dir: str | Path) -> list[str]:
    """The pip requirements of the pyfunc model over ``model_dir``, pinned to this environment's versions:
    what every folder needs, ONNX Runtime for a folder whose step runs on it, SentencePiece for one of pieces."""
    import numpy
    import torch

    from nextword.modeldir import read_engine_options
    from nextword.tokenizer import SENTENCEPIECE, Tokenizer

    pinned = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
              f"numpy=={numpy.__version__}", f"pandas=={pd.__version__}"]
    if read_engine_options(model_dir).backend == "onnx":  # the folder's step runs on ONNX Runtime
        import onnxruntime

        pinned.append(f"onnxruntime=={onnxruntime.__version__}")
    if Tokenizer.load(model_dir).kind == SENTENCEPIECE:
        import sentencepiece

        pinned.append(f"sentencepiece=={sentencepiece.__version__}")
    return pinned


def log_model(model_dir: str | Path, name: str = "suggester"):
    """Log the engine over the servable ``model_dir`` as a pyfunc model into the active MLflow run; its ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=__file__,  # models from code: this file, run at load time, sets the model
        artifacts={"model": str(model_dir)},
        code_paths=[str(Path(nextword.__file__).parent)],
        signature=SIGNATURE,
        input_example=pd.DataFrame({"text": ["hi , how are "], "speaker": ["user"], "k": [DEFAULT_K]}),
        # Named, not inferred: inference would load the model in a subprocess, for seconds.
        pip_requirements=requirements(model_dir),
    )


mlflow.models.set_model(Suggester())
