"""Label scoring: the probability of each of a fixed set of continuations after a prompt, no sampling.

`score_labels(model, tok, prompts, [" yes", " no"])` -> per prompt, P(label | prompt) normalised
over the labels (sums to 1). A label's log-probability is the sum of its tokens' log-probs,
teacher-forced (no length normalisation), so multi-token labels ("10", " not sure") work.

Tokenisation at the prompt/label boundary: prompt and label are tokenised *separately* and
concatenated. The prompt's tokens are then the same for every label (one prefill serves all of
them), and a label is always the same token sequence, which is what the model would have to
generate after that exact prompt. Joint tokenisation could merge the prompt's last characters
with the label's first into one token, scoring a different split of the prompt per label. So
write the label with its leading space (" yes") after a raw-text prompt, and without one after
a chat prompt, whose assistant header ends in a newline.

Cost per batch of prompts: one forward over the (left-padded) prompts, whose last position gives
every label's first token; if any label has more tokens, one more forward over all labels' tails
on the prompt cache repeated per label (transformers' DynamicCache.batch_repeat_interleave).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from closedloop.errors import UserError
from closedloop.generate import Prompt, encode_prompt, eval_mode, logits_to_keep, pad_batch


def _label_ids(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    if len(labels) < 2:
        raise UserError(f"label scoring: need at least two labels, got {list(labels)}")
    ids = [tokenizer.encode(label, add_special_tokens=False) for label in labels]
    if empty := [lab for lab, i in zip(labels, ids) if not i]:
        raise UserError(f"label scoring: labels {empty} are empty after tokenization")
    if len({tuple(i) for i in ids}) < len(ids):
        raise UserError(f"label scoring: labels {list(labels)} do not tokenize to distinct token sequences")
    return ids


@torch.inference_mode()
def label_logprobs(model: Any, tokenizer: Any, prompts: Sequence[Prompt], labels: Sequence[str],
                   batch_size: int = 16) -> list[list[float]]:
    """Per prompt, log P(label tokens | prompt) for each label (summed over the label's tokens)."""
    label_ids = _label_ids(tokenizer, labels)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    if empty := [i for i, e in enumerate(encoded) if not e]:
        raise UserError(f"label scoring: prompts {empty[:5]} are empty after tokenization")
    device = model.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_lab, tail = len(label_ids), max(len(i) for i in label_ids) - 1
    first = torch.tensor([i[0] for i in label_ids], device=device)
    # Teacher forcing of tokens 2..m: feed tokens 1..m-1, read each next token's log-prob. Right-padded:
    # positions after a label's end come later (causal) and are masked out of the sum.
    feed = torch.full((n_lab, max(tail, 1)), pad, dtype=torch.long, device=device)
    target = torch.zeros_like(feed)
    valid = torch.zeros_like(feed)
    for j, ids in enumerate(label_ids):
        feed[j, : len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
        target[j, : len(ids) - 1] = torch.tensor(ids[1:], dtype=torch.long)
        valid[j, : len(ids) - 1] = 1
    keep = logits_to_keep(model, 1)
    out: list[list[float]] = []
    with eval_mode(model):
        for b in range(0, len(encoded), batch_size):
            chunk = encoded[b : b + batch_size]
            ids, mask = pad_batch(chunk, pad, device=device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=tail > 0, **keep)
            lp = torch.log_softmax(res.logits[:, -1].float(), -1)[:, first]  # (prompts, labels)
            if tail > 0:
                cache = res.past_key_values
                cache.batch_repeat_interleave(n_lab)  # rows: prompt-major, one per (prompt, label)
                t_ids = feed.repeat(len(chunk), 1)
                full_mask = torch.cat([mask.repeat_interleave(n_lab, 0), torch.ones_like(t_ids)], -1)
                t_pos = pos[:, -1:].repeat_interleave(n_lab, 0) + 1 + torch.arange(t_ids.shape[1], device=device)
                logits = model(input_ids=t_ids, attention_mask=full_mask, position_ids=t_pos,
                               past_key_values=cache, use_cache=True).logits.float()
                tok_lp = torch.log_softmax(logits, -1).gather(-1, target.repeat(len(chunk), 1)[..., None]).squeeze(-1)
                tok_lp = torch.where(valid.repeat(len(chunk), 1).bool(), tok_lp, 0.0)
                lp = lp + tok_lp.sum(-1).view(len(chunk), n_lab)
            out.extend(lp.tolist())
    return out


def score_labels(model: Any, tokenizer: Any, prompts: Sequence[Prompt], labels: Sequence[str],
                 batch_size: int = 16) -> list[list[float]]:
    """Per prompt, the labels' probabilities normalised over the set (a list summing to 1)."""
    lp = torch.tensor(label_logprobs(model, tokenizer, prompts, labels, batch_size), dtype=torch.float64)
    return torch.softmax(lp, -1).tolist()
