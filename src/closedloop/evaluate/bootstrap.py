"""Percentile-bootstrap intervals over examples, for metrics that are ratios of per-example sums.

Every evaluation metric here is sum(numerator) / sum(denominator) over examples: prompt-level
accuracy has denominator 1 per prompt, instruction-level accuracy the prompt's instruction count.
Resampling *examples* (not instructions) respects that one response is judged on all of a prompt's
instructions. The paired version resamples the same example indices for both models, so the
shared difficulty of each prompt cancels and the interval of the difference is far tighter than
two independent intervals suggest. Written here (30 lines of numpy) because scipy's bootstrap
does not do ratio-of-sums statistics over paired, weighted examples.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 256  # replicates per batch, so memory stays chunk x examples


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def _replicates(n: int, n_bootstrap: int, seed: int):
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, _CHUNK):
        yield rng.integers(0, n, size=(min(_CHUNK, n_bootstrap - start), n))


def ratio_interval(num: np.ndarray, den: np.ndarray, n_bootstrap: int, seed: int,
                   confidence: float = 0.95) -> dict[str, float]:
    """{value, ci_low, ci_high} of sum(num)/sum(den), resampling examples."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    value = float(_ratio(num.sum(keepdims=True), den.sum(keepdims=True))[0])
    if n_bootstrap == 0 or len(num) == 0:
        return {"value": value, "ci_low": value, "ci_high": value}
    boots = np.concatenate([_ratio(num[i].sum(axis=1), den[i].sum(axis=1))
                            for i in _replicates(len(num), n_bootstrap, seed)])
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi)}


def paired_difference(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray,
                      n_bootstrap: int, seed: int, confidence: float = 0.95) -> dict[str, float]:
    """{value, ci_low, ci_high, se} of metric(a) - metric(b) over the same examples (row i of a and
    b is the same example), resampling example indices once for both; `se` is the replicates'
    standard deviation, the paired standard error."""
    arrays = [np.asarray(x, dtype=float) for x in (num_a, den_a, num_b, den_b)]
    if len({len(x) for x in arrays}) != 1:
        raise ValueError("paired_difference: both models must be scored on the same examples")
    na, da, nb, db = arrays
    value = float(_ratio(na.sum(keepdims=True), da.sum(keepdims=True))[0]
                  - _ratio(nb.sum(keepdims=True), db.sum(keepdims=True))[0])
    if n_bootstrap == 0 or len(na) == 0:
        return {"value": value, "ci_low": value, "ci_high": value, "se": 0.0}
    boots = np.concatenate([_ratio(na[i].sum(axis=1), da[i].sum(axis=1)) - _ratio(nb[i].sum(axis=1), db[i].sum(axis=1))
                            for i in _replicates(len(na), n_bootstrap, seed)])
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), "se": float(boots.std(ddof=1)) if len(boots) > 1 else 0.0}
