"""Next-token choice from float32 logits: greedy, or temperature + exact nucleus (top-p) sampling.

Nucleus sampling usually sorts the whole vocabulary per row (for SmolLM2: 32 x 49152 logits,
~67 ms per step on 2 cores, a third of a decode step). Here the top `k` logits are taken first
(`topk`, ~2 ms); the nucleus is the smallest prefix of the descending order whose *exclusive*
cumulative probability stays below top_p (HF's TopPLogitsWarper keeps the same set). If the top-k
slice already holds probability mass >= top_p, the nucleus lies inside it and nothing outside
matters: the result is exact. Rows whose nucleus does not fit (flat distributions) fall back to the
full sort, with the same arithmetic, so both paths pick the same token for the same uniform draw.

Randomness is one uniform per row and step, supplied by the caller (inverse-CDF sampling), so each
sequence can own its random stream independently of which rows share its batch.
"""

from __future__ import annotations

import torch


def _nucleus_pick(vals: torch.Tensor, idx: torch.Tensor, lse: torch.Tensor, top_p: float,
                  u: torch.Tensor) -> torch.Tensor:
    """Token per row from logits `vals` sorted descending (vocab ids `idx`), full log-normaliser `lse`."""
    p = (vals - lse).exp()
    cum = p.cumsum(-1)
    # Exclusive cumulative mass (shifted, not cum - p, so the fits test below is the same number).
    keep = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], -1) < top_p  # the top token always stays
    p = p * keep
    cdf = p.cumsum(-1)
    # First index whose cdf exceeds u * mass: zero-probability entries can never be picked.
    j = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True)
    j = torch.minimum(j, keep.sum(-1, keepdim=True) - 1)
    return idx.gather(-1, j).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor | None,
                prefilter_k: int = 64) -> torch.Tensor:
    """(rows, vocab) logits -> (rows,) token ids.

    temperature 0: argmax (u unused). Otherwise softmax(logits / temperature) restricted to the
    top_p nucleus, sampled by inverse CDF with `u` in [0, 1), one per row. `prefilter_k` only
    changes speed, never the result (rows whose nucleus is larger than k are fully sorted).
    """
    if temperature == 0:
        return logits.argmax(-1)
    if u is None:
        raise ValueError("sampling needs one uniform per row")
    x = logits.float() / temperature
    if top_p >= 1.0:  # the whole distribution, in vocabulary order
        cdf = torch.softmax(x, -1).cumsum(-1)
        j = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True)
        return j.clamp_(max=x.shape[-1] - 1).squeeze(-1)
    lse = torch.logsumexp(x, -1, keepdim=True)
    k = min(prefilter_k, x.shape[-1])
    vals, idx = x.topk(k, dim=-1, sorted=True)
    out = _nucleus_pick(vals, idx, lse, top_p, u)
    # exp(vals - lse) summed over the slice = its mass; the nucleus fits iff that mass reaches top_p.
    fits = (vals - lse).exp().cumsum(-1)[:, -1] >= top_p
    if k < x.shape[-1] and not bool(fits.all()):
        rows = (~fits).nonzero().squeeze(-1)
        vals, idx = x[rows].sort(dim=-1, descending=True)
        out[rows] = _nucleus_pick(vals, idx, lse[rows], top_p, u[rows])
    return out
