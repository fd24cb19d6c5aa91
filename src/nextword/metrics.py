"""Held-out scoring: perplexity over every target token, next-word accuracy over word tokens.

* Perplexity is exp(mean negative log-likelihood) over every non-PAD target
  (words, punctuation and the structure tokens alike), the usual LM figure.
* Top-1/top-3 accuracy is over targets that are words (an out-of-vocabulary
  word counts as a word and always as a miss), and the candidates are words
  only, as a suggestion strip would show them.

The split's windows are read in lanes with the recurrent state carried from
one window to the next, the same way training reads them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nextword.text import is_word
from nextword.vocab import PAD_ID, UNK, Vocab
from nextword.windows import lanes


def word_masks(vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """(targets that count as words, tokens that may be suggested)."""
    suggestable = np.array([is_word(t) for t in vocab.tokens], dtype=bool)
    target_words = suggestable.copy()
    target_words[vocab.id(UNK)] = True
    return target_words, suggestable


@torch.no_grad()
def evaluate(model, windows: np.ndarray, vocab: Vocab, batch_size: int = 64, device="cpu") -> dict:
    model.eval()
    target_words, suggestable = (torch.from_numpy(m).to(device) for m in word_masks(vocab))
    not_suggestable = ~suggestable
    batch_size = max(1, min(batch_size, len(windows)))
    data = torch.from_numpy(lanes(windows, batch_size, pad_tail=True))
    nll = 0.0
    tokens = words = top1 = top3 = 0
    state = None
    for step in range(data.shape[0]):
        batch = data[step].to(device).long()
        inp, tgt = batch[:, :-1], batch[:, 1:]
        feats, state = model.features(inp, state)
        lp = model.log_probs(feats).float()
        keep = tgt != PAD_ID
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[keep].sum().item()
        tokens += int(keep.sum())
        is_word_target = target_words[tgt] & keep
        best = lp.masked_fill(not_suggestable, -math.inf).topk(3, dim=-1).indices
        hits = best == tgt.unsqueeze(-1)
        top1 += int((hits[..., 0] & is_word_target).sum())
        top3 += int((hits.any(-1) & is_word_target).sum())
        words += int(is_word_target.sum())
    mean_nll = nll / max(tokens, 1)
    return {
        "nll": mean_nll,
        "perplexity": math.exp(mean_nll),
        "tokens": tokens,
        "top1": top1 / max(words, 1),
        "top3": top3 / max(words, 1),
        "word_tokens": words,
    }
