"""T5 span corruption (Raffel et al. 2020, section 3.1.4 and `random_spans_noise_mask` in T5's code).

Of a sequence of `length` tokens, round(length * noise_density) are noise, grouped into
round(num_noise / mean_span_length) spans. Span boundaries are uniformly random compositions of the
noise and non-noise counts; spans alternate non-noise, noise, non-noise, ... The encoder input keeps
the non-noise tokens and replaces each noise span by one sentinel; the target is each sentinel
followed by the tokens it replaced. Inputs plus targets therefore reconstruct the original.

Written by hand because megatron-core's T5 dataset samples span lengths from a different
(Poisson-like, n-gram) distribution and needs its own tokenizer class; this follows the paper.
"""

from __future__ import annotations

import numpy as np

# the sentinel tokens that stand for the noise spans: T5's `<extra_id_i>`, 100 of them
SENTINEL = "<extra_id_{}>"
N_SENTINELS = 100  # T5's extra_ids


def _random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `n_segments` non-empty segments summing to `n_items`, uniformly at random."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence of `length` tokens: the same for every draw, so
    the sentinels a sequence length needs are known before the first batch."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def noise_mask(length: int, noise_density: float, mean_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of noise positions, as T5's `random_spans_noise_mask`."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    noise_lens = _random_segmentation(num_noise, num_spans, rng)
    keep_lens = _random_segmentation(length - num_noise, num_spans, rng)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for keep, noise in zip(keep_lens, noise_lens):
        pos += keep
        mask[pos:pos + noise] = True
        pos += noise
    return mask


def corrupt(tokens: np.ndarray, sentinels: list[int], rng: np.random.Generator,
            noise_density: float = 0.15, mean_span_length: float = 3.0,
            eos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) for one sequence. `sentinels[i]` replaces the i-th noise span."""
    tokens = np.asarray(tokens)
    mask = noise_mask(len(tokens), noise_density, mean_span_length, rng)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    n_spans = int(starts.sum())
    if n_spans > len(sentinels):
        raise ValueError(f"{n_spans} noise spans but only {len(sentinels)} sentinel tokens")
    span_id = np.cumsum(starts) - 1  # index of the span a position belongs to
    sent = np.asarray(sentinels)
    inputs = np.where(starts, sent[np.clip(span_id, 0, None)], tokens)[~mask | starts]
    targets = []
    for i in range(n_spans):
        targets.append(sent[i])
        targets.extend(tokens[mask & (span_id == i)])
    if eos is not None:
        inputs = np.append(inputs, eos)
        targets.append(eos)
    return inputs, np.asarray(targets, dtype=tokens.dtype)


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: list[int]) -> np.ndarray:
    """Undo `corrupt` (without eos): put each sentinel's target tokens back in its place."""
    sentinel_set = set(int(s) for s in sentinels)
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist():
        if t in sentinel_set:
            current = t
            spans[current] = []
        elif current is not None:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs.tolist():
        out.extend(spans[t] if t in sentinel_set else [t])
    return np.asarray(out)
