"""nextword: an LSTM next-word predictor and chat autocomplete, built as a DVC pipeline."""

__version__ = "0.1.0"
