"""Choosing tokens from next-token distributions: greedy, temperature, top-k, top-p and beam search.

Every strategy works on log-probability vectors (numpy) and a ``step``
function ``step(token_id, state) -> (log_probs, state)`` that advances the
model by one token, so the recurrent state is carried, never recomputed.
Tokens that must never be produced (specials, banned words) are removed
from the distribution *before* choosing, by a boolean ``blocked`` mask.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

Step = Callable[[int, Any], "tuple[np.ndarray, Any]"]
# The one list of line-completion strategies (the CLI, the web API and the sample stage read it).
# "sample" draws after temperature, then the top-k cut, then the top-p (nucleus) cut; each knob
# at its neutral value (1, 0, 1) leaves the distribution as it is.
STRATEGIES = ("greedy", "sample", "beam")


def masked(log_probs: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    out = np.array(log_probs, dtype=np.float64)
    out[blocked] = -np.inf
    return out


def _softmax(scores: np.ndarray) -> np.ndarray:
    z = np.exp(scores - scores.max())
    return z / z.sum()


def top_p_keep(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set whose cumulative probability is >= top_p (most probable first)."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    size = int(np.searchsorted(cumulative, top_p - 1e-12)) + 1  # tolerance: 0.5 + 0.2 must reach 0.7
    return order[: min(size, len(order))]


def sampling_distribution(log_probs: np.ndarray, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(candidate ids, their probabilities) after temperature, then the top-k cut, then the top-p cut.

    ``top_k`` 0 and ``top_p`` 1 mean no cut. Blocked tokens (-inf) are never candidates.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    scores = np.asarray(log_probs, dtype=np.float64) / temperature
    candidates = np.flatnonzero(np.isfinite(scores))
    if top_k:
        candidates = candidates[np.argsort(-scores[candidates], kind="stable")[:top_k]]
    probs = _softmax(scores[candidates])
    if top_p < 1:
        keep = top_p_keep(probs, top_p)
        candidates, probs = candidates[keep], probs[keep] / probs[keep].sum()
    return candidates, probs


def choose(
    log_probs: np.ndarray,
    strategy: str,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> int:
    """Pick one token id from already-masked log-probabilities: the argmax, or a sample."""
    if strategy == "greedy":
        return int(np.argmax(log_probs))
    if strategy != "sample":
        raise ValueError(f"choose takes greedy or sample, not {strategy!r}")
    candidates, probs = sampling_distribution(log_probs, temperature, top_k, top_p)
    return int(rng.choice(candidates, p=probs))


def sample_line(
    step: Step,
    state: Any,
    log_probs: np.ndarray,
    blocked: np.ndarray,
    eos_id: int,
    max_tokens: int,
    strategy: str = "greedy",
    rng: np.random.Generator | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[int]:
    """Extend a line token by token until ``eos_id`` or ``max_tokens``; ``eos_id`` is not returned."""
    if strategy not in ("greedy", "sample"):
        raise ValueError(f"sample_line takes greedy or sample, not {strategy!r}; beam search is beam_search")
    rng = rng or np.random.default_rng(0)
    out: list[int] = []
    for _ in range(max_tokens):
        token = choose(masked(log_probs, blocked), strategy, rng, temperature, top_k, top_p)
        if token == eos_id:
            break
        out.append(token)
        log_probs, state = step(token, state)
    return out


def beam_search(
    step: Step,
    state: Any,
    log_probs: np.ndarray,
    blocked: np.ndarray,
    eos_id: int,
    max_tokens: int,
    beam_size: int = 4,
) -> list[int]:
    """The most probable continuation by length-normalised log-probability; ``eos_id`` not returned."""
    beams = [(0.0, [], state, log_probs)]  # (score, tokens, state, next log-probs)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_tokens):
        expansions = []
        for score, tokens, beam_state, lp in beams:
            lp = masked(lp, blocked)
            for token in np.argsort(-lp, kind="stable")[:beam_size]:
                if np.isfinite(lp[token]):
                    expansions.append((score + float(lp[token]), tokens, beam_state, int(token)))
        expansions.sort(key=lambda e: -e[0])
        beams = []
        for score, tokens, beam_state, token in expansions[:beam_size]:
            if token == eos_id:
                finished.append((score / (len(tokens) + 1), tokens))
            else:
                next_lp, next_state = step(token, beam_state)
                beams.append((score, tokens + [token], next_state, next_lp))
        if not beams or (len(finished) >= beam_size and max(f[0] for f in finished) > max(b[0] / len(b[1]) for b in beams)):
            break
    finished.extend((score / max(len(tokens), 1), tokens) for score, tokens, _, _ in beams)
    return max(finished, key=lambda f: f[0])[1] if finished else []
