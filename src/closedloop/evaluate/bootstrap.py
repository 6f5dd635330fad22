"""Percentile-bootstrap intervals over examples, for metrics that are ratios of per-example sums.

Every evaluation metric here is sum(numerator) / sum(denominator) over examples: prompt-level
accuracy has denominator 1 per prompt, instruction-level accuracy the prompt's instruction count.
Resampling *examples* (not instructions) respects that one response is judged on all of a prompt's
instructions. The paired version resamples the same example indices for both models, so the
shared difficulty of each prompt cancels and the interval of the difference is far tighter than
two independent intervals suggest. Written here (30 lines of numpy) because scipy's bootstrap
does not do ratio-of-sums statistics over paired, weighted examples.

Clustered: examples built from one seed task share its difficulty (and often its outcome), so
they are not independent draws. `cluster_sums` adds each cluster's numerators and denominators
up; bootstrapping those sums resamples whole clusters, pairing kept (the same clusters for both
models), which is the cluster bootstrap of a ratio of sums. Its interval is wider whenever
examples of a cluster agree more than examples of different clusters.
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


def cluster_sums(clusters: list, *arrays: np.ndarray) -> list[np.ndarray]:
    """Each array summed within clusters (`clusters[i]` names example i's cluster), in first-seen
    cluster order: bootstrap these to resample whole clusters."""
    index: dict = {}
    ids = np.array([index.setdefault(c, len(index)) for c in clusters])
    return [np.bincount(ids, weights=np.asarray(a, dtype=float), minlength=len(index)) for a in arrays]


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


def _auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC per row of 2-D (replicates, examples) arrays, by the Mann-Whitney rank sum (ties
    count half); NaN for a row with one class only."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    pos = labels.sum(axis=1)
    neg = labels.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(labels, ranks, 0.0).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)


def paired_auc_difference(labels: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, n_bootstrap: int, seed: int,
                          confidence: float = 0.95) -> dict[str, float]:
    """{value, ci_low, ci_high, se, auc_a, auc_b} of AUC(a) - AUC(b) on the same labelled examples,
    resampling examples once for both: a threshold-free comparison (a model that answers one
    way for everything has AUC 0.5, whatever its accuracy)."""
    y = np.asarray(labels, dtype=bool)[None, :]
    a, b = np.asarray(score_a, dtype=float)[None, :], np.asarray(score_b, dtype=float)[None, :]
    auc_a, auc_b = float(_auc(y, a)[0]), float(_auc(y, b)[0])
    out = {"value": auc_a - auc_b, "auc_a": auc_a, "auc_b": auc_b}
    if n_bootstrap == 0:
        return out | {"ci_low": out["value"], "ci_high": out["value"], "se": 0.0}
    boots = np.concatenate([_auc(y[0][i], a[0][i]) - _auc(y[0][i], b[0][i])
                            for i in _replicates(y.shape[1], n_bootstrap, seed)])
    boots = boots[np.isfinite(boots)]  # a replicate that drew one class only has no AUC
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return out | {"ci_low": float(lo), "ci_high": float(hi), "se": float(boots.std(ddof=1))}
