"""Held-out scoring: perplexity over every target token, next-word accuracy over word tokens.

* Perplexity is exp(mean negative log-likelihood) over every non-PAD target
  (words, punctuation and the structure tokens alike), the usual LM figure.
  Its unit is the tokenizer's token, so a subword model's is not comparable
  with a word model's; per-word perplexity is: exp(the split's total NLL /
  its number of words), where the number of words is the same for every
  tokenizer, the word tokenizer's count of the split's targets
  (:func:`nextword.windows.word_targets`: every word, punctuation mark and
  layout token, ``<EOS>`` included). For the word tokenizer the two are equal.
* Top-1/top-3 accuracy is over targets that are words (an out-of-vocabulary
  word counts as a word and always as a miss), and the candidates are words
  only, as a suggestion strip would show them.
  For a subword model the targets and candidates are pieces; the keystroke
  simulation's top-1/top-3 (:mod:`nextword.keystrokes`) are over whole words
  for every tokenizer.

Both the LSTM and the n-gram baseline are scored by :class:`Scores`, on the
same targets. The LSTM reads a split's windows in lanes with the recurrent
state carried from one window to the next, the same way training reads them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nextword.ngram import stream_from_windows
from nextword.text import is_word
from nextword.vocab import PAD_ID, UNK, Vocab
from nextword.windows import lanes


def word_masks(vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """(targets that count as words, tokens that may be suggested)."""
    suggestable = np.array([is_word(t) for t in vocab.tokens], dtype=bool)
    target_words = suggestable.copy()
    target_words[vocab.id(UNK)] = True
    return target_words, suggestable


class Scores:
    """Running totals over scored positions: the one place where the metrics are computed.

    ``add`` takes ``[..., V]`` log-probabilities and ``[...]`` target ids from
    any model (the LSTM, the n-gram baseline); PAD targets are skipped.
    """

    def __init__(self, vocab: Vocab, device="cpu"):
        target_words, suggestable = (torch.from_numpy(m).to(device) for m in word_masks(vocab))
        self.target_words = target_words
        # Added to log-probabilities so that only words can be suggested: cheaper than masked_fill.
        self.not_suggestable = torch.zeros(len(vocab), device=device).masked_fill(~suggestable, -math.inf)
        self.nll = 0.0
        self.tokens = self.words = self.top1 = self.top3 = 0

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        """Score ``[..., V]`` log-probabilities against ``[...]`` targets."""
        flat = log_probs.reshape(-1, log_probs.shape[-1])
        self.add_blocks(log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), targets,
                        lambda rows: [(0, None, lambda ranked: flat[rows][ranked])])

    def add_blocks(self, target_log_probs: torch.Tensor, targets: torch.Tensor, blocks) -> None:
        """Score from each target's log-probability and, for the rows to rank, the vocabulary in blocks.

        ``blocks(rows)``, for the boolean row mask ``rows`` (of the flattened targets), gives
        ``(first id, bound, block)`` triples whose blocks cover the vocabulary: ``block(ranked)`` is the
        ``[rows, width]`` log-probabilities of the rows of the boolean mask ``ranked`` (over the rows of
        ``rows``), and ``bound``, when not None, is a log-probability that no entry of a row's block
        exceeds. A block is worked out only for the rows whose top 3 so far it could still enter, which
        is exact: an adaptive softmax's clusters (:func:`adaptive_blocks`) are bounded by their own
        probability, and need never be laid out as one ``[rows, V]`` matrix.
        """
        targets, target_log_probs = targets.reshape(-1), target_log_probs.reshape(-1)
        keep = targets != PAD_ID
        self.nll -= target_log_probs[keep].sum().item()
        self.tokens += int(keep.sum())
        # Accuracy is over word targets only, so only their rows are ranked.
        is_word_target = self.target_words[targets] & keep
        word_targets = targets[is_word_target]
        values = torch.full((len(word_targets), 3), -math.inf)
        ids = torch.full((len(word_targets), 3), -1, dtype=torch.long)
        for start, bound, block in blocks(is_word_target):
            ranked = torch.ones(len(word_targets), dtype=torch.bool) if bound is None else bound >= values[:, -1]
            if not ranked.any():
                continue
            scores = block(ranked)
            scores = scores + self.not_suggestable[start:start + scores.shape[-1]]
            top = scores.topk(min(3, scores.shape[-1]), dim=-1)
            merged = torch.cat([values[ranked], top.values], dim=-1).topk(3, dim=-1)
            values[ranked] = merged.values
            ids[ranked] = torch.cat([ids[ranked], top.indices + start], dim=-1).gather(-1, merged.indices)
        hits = ids == word_targets.unsqueeze(-1)
        self.top1 += int(hits[:, 0].sum())
        self.top3 += int(hits.any(-1).sum())
        self.words += len(word_targets)

    def result(self) -> dict:
        mean_nll = self.nll / max(self.tokens, 1)
        return {
            "nll": mean_nll,
            "perplexity": math.exp(mean_nll),
            "tokens": self.tokens,
            "top1": self.top1 / max(self.words, 1),
            "top3": self.top3 / max(self.words, 1),
            "word_tokens": self.words,
        }


def per_word(result: dict, words: int) -> dict:
    """Per-word perplexity of a :meth:`Scores.result`: its total NLL over ``words`` (see the module docstring)."""
    total_nll = result["nll"] * result["tokens"]
    return {"words": words, "word_perplexity": math.exp(total_nll / max(words, 1))}


def adaptive_blocks(head: torch.nn.AdaptiveLogSoftmaxWithLoss, features: torch.Tensor, targets: torch.Tensor):
    """(each target's log-probability, ``blocks`` for :meth:`Scores.add_blocks`) from an adaptive softmax.

    The numbers are those of ``head.log_prob`` (the same operations, in the same order, up to the
    rounding of a product over fewer rows), but a cluster's log-probabilities are computed only for
    the rows whose target is in it, or that are ranked and whose top 3 the cluster's probability
    could enter, and never copied into one ``[rows, V]`` matrix.
    """
    x, targets = features.reshape(-1, features.shape[-1]).float(), targets.reshape(-1)
    head_log_probs = torch.log_softmax(head.head(x), dim=1)
    shortlist = head.shortlist_size
    target_log_probs = head_log_probs.gather(1, targets.clamp(max=shortlist - 1).unsqueeze(1)).squeeze(1)
    clusters = list(zip(head.cutoffs, head.cutoffs[1:]))

    def cluster(i: int, rows: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(head.tail[i](x[rows]), dim=1) + head_log_probs[rows, shortlist + i].unsqueeze(1)

    for i, (start, stop) in enumerate(clusters):
        inside = (targets >= start) & (targets < stop)
        if inside.any():
            picked = cluster(i, inside).gather(1, (targets[inside] - start).unsqueeze(1)).squeeze(1)
            target_log_probs = target_log_probs.masked_scatter(inside, picked)

    def blocks(rows: torch.Tensor):
        at = rows.nonzero().squeeze(1)
        yield 0, None, lambda ranked: head_log_probs[at[ranked], :shortlist]
        for i, (start, _) in enumerate(clusters):
            # A word of the cluster is at most as likely as the cluster.
            yield start, head_log_probs[at, shortlist + i], lambda ranked, i=i: cluster(i, at[ranked])

    return target_log_probs, blocks


@torch.no_grad()
def evaluate(model, windows: np.ndarray, vocab: Vocab, batch_size: int = 64, device="cpu",
             accuracy: bool = True) -> dict:
    """:meth:`Scores.result` of the model on ``windows``, read in ``batch_size`` lanes with the state carried.

    Without ``accuracy``, the perplexity alone: no word is ranked, which takes about half the time,
    and the result has no top-1 and top-3.
    """
    model.eval()
    scores = Scores(vocab, device)
    batch_size = max(1, min(batch_size, len(windows)))
    data = torch.from_numpy(lanes(windows, batch_size, pad_tail=True))
    state = None
    for step in range(data.shape[0]):
        batch = data[step].to(device).long()
        feats, state = model.features(batch[:, :-1], state)
        targets = batch[:, 1:]
        if model.head is None:
            log_probs = model.log_probs(feats).float()
            if accuracy:
                scores.add(log_probs, targets)
            else:
                scores.add_blocks(log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), targets, lambda rows: [])
        else:
            with torch.autocast(feats.device.type, enabled=False):
                target_log_probs, blocks = adaptive_blocks(model.head, feats, targets)
                scores.add_blocks(target_log_probs, targets, blocks if accuracy else lambda rows: [])
    result = scores.result()
    if not accuracy:
        for name in ("top1", "top3", "word_tokens"):
            del result[name]
    return result


def evaluate_ngram(model, windows: np.ndarray, vocab: Vocab) -> dict:
    """Score an n-gram model (:mod:`nextword.ngram`) on the same targets as :func:`evaluate`.

    Every non-PAD target of the windows is scored, with up to N - 1 ids of the
    split's stream before it as context (across window boundaries, like the
    LSTM's carried state).

    The suggestions are ranked on the probabilities themselves, the same order as their logarithms, so
    the logarithm is taken of the targets' probabilities only, not of every entry.
    """
    scores = Scores(vocab)
    for probs, targets in model.stream_probs(stream_from_windows(windows)):
        target_log_probs = np.log(probs[np.arange(len(targets)), targets])
        ranked = torch.from_numpy(probs)
        scores.add_blocks(torch.from_numpy(target_log_probs), torch.from_numpy(targets),
                          lambda rows: [(0, None, lambda subset: ranked[rows][subset])])
    return scores.result()
