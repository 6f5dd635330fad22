"""PPO with a per-token KL penalty to the SFT model (the InstructGPT RLHF recipe), on Accelerate.

This is the one trainer the project writes itself: TRL 1.16 has no PPOTrainer (it moved to
`trl.experimental` and was then deleted), and OpenRLHF needs GPUs, Ray and DeepSpeed. It follows
the published details: Huang et al., "The N+ implementation details of RLHF with PPO"
(arXiv 2403.17031), TRL's last PPOTrainer (v0.19) and OpenRLHF:

- one PPO step = a rollout of `rollout_batch_size` prompts (one response each, sampled at
  `temperature` by the project's engine), then `num_ppo_epochs` passes over shuffled mini-batches;
- the reward of a response is its score (the reward model's, through `reward_fn`) on its EOS
  token, plus `-kl_coef * KL_t` on every response token (KL to the reference = the starting
  policy; k1 or k3 estimator). TRL put the score one slot after the EOS; here it is on the EOS;
- a response without EOS (cut at `max_new_tokens`) scores `score - missing_eos_penalty` (TRL 0.19);
- advantages by GAE (value after the last token is 0), always whitened over the batch's tokens;
- clipped surrogate policy loss + `vf_coef` x clipped value loss, one AdamW over both models;
- log-probs are recomputed at the sampling temperature, and dropout is off in every model, so
  the probability ratio is exactly 1 in the first mini-batch (logged: `first_ratio_max_dev`);
- explicit position ids: prompts left-padded, responses right-padded after EOS, pads never
  attended (the pad id is never a stop token, so EOS and padding cannot be confused).

Policy: LoRA on the SFT checkpoint by default; the reference is the same model with its adapter
disabled, so one copy of the weights serves both. Without LoRA a frozen second copy is loaded.
Value model: initialised from the reward model checkpoint (per-token values = its `score` head on
every position's last hidden state, as TRL did). With LoRA it gets its own adapter plus a fully
trained `score` head (`modules_to_save`), for the policy's reason: the optimizer states of a full
second model are what run out of memory first; without LoRA both are trained fully.

Rollouts read the sampled token ids from the engine (`EngineBackend.sample_ids`), not a re-tokenization
of the text, which would not give back the same tokens. The result is saved like every trainer's
(`save_trained`'s layout): the adapter in out_dir/adapter and a merged plain safetensors checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from closedloop import progress
from closedloop.config import PPOParams

# ----------------------------------------------------------------------------------------------
# Pure tensor functions (shapes: B sequences x L response tokens; `mask` is bool, True on tokens)


def masked_mean(x, mask):
    """Mean of x over mask (torch.where, so a NaN or inf under the mask cannot leak in)."""
    return x.where(mask, 0).sum() / mask.sum().clamp(min=1)


def logprobs_from_logits(logits, tokens, temperature: float = 1.0):
    """log softmax(logits / temperature) at `tokens`: (..., V) logits, (...) ids -> (...) float32."""
    x = logits.float() / temperature
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - x.logsumexp(-1)


def entropy_from_logits(logits, temperature: float = 1.0):
    """Entropy of softmax(logits / temperature) per position: (..., V) -> (...)."""
    import torch

    x = logits.float() / temperature
    return x.logsumexp(-1) - (torch.softmax(x, -1) * x).sum(-1)


def kl_estimate(logp, ref_logp, estimator: str = "k1"):
    """Per-token KL(policy || reference) estimate from the sampled tokens' log-probs.
    k1 = log p - log p_ref; k3 = (r - 1) - log r with r = p_ref / p (>= 0; both 0 when equal)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_r = ref_logp - logp
        return log_r.exp() - 1 - log_r
    raise ValueError(f"unknown KL estimator {estimator!r} (expected k1 or k3)")


def whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); masked-out entries -> 0.
    shift_mean=False keeps the mean (rescales only), as TRL whitens rewards."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    if n > 1:
        var = var * n / (n - 1)
    out = (x - mean) * (var + 1e-8).rsqrt()
    if not shift_mean:
        out = out + mean
    return out.where(mask, 0)


def response_mask(eos_index, length: int):
    """(B,) index of each response's last real token -> (B, L) mask of its tokens (right-padded after)."""
    import torch

    return torch.arange(length, device=eos_index.device).unsqueeze(0) <= eos_index.unsqueeze(1)


def penalise_missing_eos(scores, has_eos, penalty: float | None):
    """TRL 0.19: a response that never wrote EOS scores `score - penalty`."""
    return scores if penalty is None else scores.where(has_eos, scores - penalty)


def per_token_rewards(scores, kl, eos_index, kl_coef: float):
    """-kl_coef * KL_t on every response token, plus the sequence's score on its last token (the EOS
    itself when there is one; TRL added it one slot later). Tokens after it get 0."""
    import torch

    mask = response_mask(eos_index, kl.shape[1])
    rewards = (-kl_coef * kl).where(mask, 0)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, eos_index] += scores.to(rewards.dtype)
    return rewards


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded responses: (advantages, returns), both 0
    outside the mask. delta_t = r_t + gamma V_{t+1} - V_t (V after the last token = 0),
    A_t = delta_t + gamma lam A_{t+1}; returns = A + V."""
    import torch

    rewards, values = rewards.where(mask, 0), values.where(mask, 0)
    length = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last).where(mask[:, t], 0)
        out.append(last)
    advantages = torch.stack(out[::-1], 1)
    return advantages, (advantages + values).where(mask, 0)


def policy_loss(new_logp, old_logp, advantages, mask, clip: float):
    """PPO clipped surrogate, masked mean: (loss, clip_frac, approx_kl). clip_frac: the share of
    tokens where the clipped term binds (TRL's pg_clipfrac); approx_kl = 0.5 mean((new - old)^2)."""
    diff = new_logp - old_logp
    ratio = diff.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(unclipped.maximum(clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(diff.detach() ** 2, mask)
    return loss, clip_frac.detach(), approx_kl


def value_loss(new_values, old_values, returns, mask, clip_value: float):
    """0.5 max((v - R)^2, (clip(v, v_old +- c) - R)^2), masked mean: (loss, clip_frac)."""
    clipped = old_values + (new_values - old_values).clamp(-clip_value, clip_value)
    a, b = (new_values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(a.maximum(b), mask), masked_mean((b > a).float(), mask).detach()


# ----------------------------------------------------------------------------------------------
# Rollout batches


@dataclass
class RolloutBatch:
    """Prompts left-padded to P, responses right-padded to L: input_ids (B, P + L) etc."""
    input_ids: Any
    attention_mask: Any
    position_ids: Any
    responses: Any  # (B, L) response token ids (pad after the last one)
    mask: Any  # (B, L) bool: real response tokens, the EOS included
    eos_index: Any  # (B,) index in the response of its last real token
    has_eos: Any  # (B,) bool: the response ends with a stop token
    prompt_width: int

    def rows(self, idx) -> RolloutBatch:
        return RolloutBatch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                            self.responses[idx], self.mask[idx], self.eos_index[idx], self.has_eos[idx],
                            self.prompt_width)


def build_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
                stop_ids: Sequence[int], device: Any = "cpu") -> RolloutBatch:
    """Tensors for prompt + response sequences; position ids count real tokens only (left pads
    take position 0 and are never attended)."""
    import torch

    from closedloop.generate import pad_batch

    if any(not r for r in response_ids):
        raise ValueError("every response needs at least one token")
    # prompts end at one column, responses start at the next
    (q_ids, q_mask), (r_ids, r_mask) = pad_batch(prompt_ids, pad_id), pad_batch(response_ids, pad_id, side="right")
    ids, attn = torch.cat([q_ids, r_ids], -1), torch.cat([q_mask, r_mask], -1)
    width_p, width_r = q_ids.shape[1], r_ids.shape[1]
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    eos_index = torch.tensor([len(r) - 1 for r in response_ids], dtype=torch.long)
    stops = set(stop_ids)
    has_eos = torch.tensor([r[-1] in stops for r in response_ids], dtype=torch.bool)
    return RolloutBatch(ids.to(device), attn.to(device), positions.to(device), ids[:, width_p:].to(device),
                        response_mask(eos_index, width_r).to(device), eos_index.to(device), has_eos.to(device),
                        width_p)


def response_logits(model: Any, batch: RolloutBatch):
    """The causal LM's logits predicting each response token: positions P-1 .. P+L-2, (B, L, V)."""
    from closedloop.generate import logits_to_keep

    length = batch.responses.shape[1]
    kw = logits_to_keep(model, length + 1)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False, **kw).logits
    return logits[:, -(length + 1): -1]


def response_logprobs(model: Any, batch: RolloutBatch, temperature: float):
    """(log-probs of the response tokens at `temperature`, entropy per token), both (B, L) float32."""
    logits = response_logits(model, batch)
    return logprobs_from_logits(logits, batch.responses, temperature), entropy_from_logits(logits, temperature)


def _value_parts(value_model: Any):
    """(backbone, score head) of a sequence-classification model, PEFT-wrapped or not."""
    inner = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no `score` head: the value model must be a "
                         f"*ForSequenceClassification checkpoint with one (as the reward model is)")
    return getattr(inner, inner.base_model_prefix), head


def response_values(value_model: Any, batch: RolloutBatch):
    """V(state before each response token): the score head on positions P-1 .. P+L-2, (B, L) float32."""
    backbone, head = _value_parts(value_model)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False).last_hidden_state
    length = batch.responses.shape[1]
    return head(hidden[:, -(length + 1): -1]).squeeze(-1).float()


def _policy_and_value_module():
    import torch

    class PolicyAndValue(torch.nn.Module):
        """Both trained models as one module: one `prepare`, one optimizer, one backward (TRL's wrapper)."""

        def __init__(self, policy: Any, value: Any):
            super().__init__()
            self.policy, self.value = policy, value

        def forward(self, batch: RolloutBatch):
            return response_logits(self.policy, batch), response_values(self.value, batch)

    return PolicyAndValue


# ----------------------------------------------------------------------------------------------
# Models


def disable_dropout(model: Any) -> None:
    """Every dropout probability to 0: nn.Dropout modules (LoRA's included) and float attributes
    named *dropout* that modules copy from their config (e.g. Llama's functional attention dropout)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, val in list(vars(m).items()):
            if "dropout" in name and isinstance(val, float):
                setattr(m, name, 0.0)


def pad_token_id(tok: Any, stop_ids: Sequence[int]) -> int:
    """A pad id that is no stop token (SmolLM2 pads with its EOS); it only fills masked positions."""
    stops = set(stop_ids)
    for cand in (tok.pad_token_id, tok.unk_token_id):
        if cand is not None and cand not in stops:
            return int(cand)
    return next(i for i in range(len(tok)) if i not in stops)


def _load_policy(policy_dir: Path, p: PPOParams, seed: int, dtype: str):
    """(tokenizer, policy, frozen reference or None when the reference is the disabled adapter)."""
    from closedloop.feedback.common import load_for_training, lora_config

    tok, model = load_for_training(policy_dir, dtype, seed)
    ref = None
    if p.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(p.lora))
    else:
        _, ref = load_for_training(policy_dir, dtype, seed)
        ref.requires_grad_(False)
        disable_dropout(ref)
        ref.eval()
    disable_dropout(model)
    return tok, model, ref


def _load_value(value_dir: Path, p: PPOParams, dtype: str):
    from closedloop.feedback.reward_model import load_reward_model

    _, model = load_reward_model(value_dir, dtype)
    if p.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                                                 target_modules=p.lora.target_modules, task_type="SEQ_CLS",
                                                 modules_to_save=["score"]))
    disable_dropout(model)
    return model


def _prompt_batches(n: int, size: int, seed: int) -> Iterator[list[int]]:
    """Prompt indices, `size` at a time, through seeded shuffles of all n (repeating as needed)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        while len(order) < size:
            order += torch.randperm(n, generator=gen).tolist()
        yield order[:size]
        order = order[size:]


def _lr_lambda(warmup: float, total: int) -> Callable[[int], float]:
    steps = warmup * total if warmup < 1 else warmup
    return lambda s: min(1.0, (s + 1) / steps) if steps > 0 else 1.0


# ----------------------------------------------------------------------------------------------
# The trainer


RewardFn = Callable[[list, list[str]], Sequence[float]]


def train_ppo(policy_dir: Path, value_init_dir: Path, prompts: Sequence[Any], reward_fn: RewardFn, out_dir: Path,
              p: PPOParams, *, seed: int, dtype: str = "float32",
              on_step: Callable[[int, dict], None] | None = None) -> dict:
    """PPO from the SFT checkpoint in policy_dir, values from the reward model in value_init_dir.

    prompts: chat prompts (lists of messages) or strings, tokenized as the engine does
    (`encode_prompt`). reward_fn(prompts, responses) -> one score per response (the reward model's).
    Saves into out_dir (merged LoRA by default) and returns {"train_steps", "history", "final_kl", ...};
    each history entry is also passed to `on_step(step, metrics)`.
    """
    import torch
    from accelerate import Accelerator

    from closedloop.engine import EngineBackend
    from closedloop.generate import SamplingParams, make_completion

    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    policy_dir, value_init_dir, out_dir = Path(policy_dir), Path(value_init_dir), Path(out_dir)
    start = time.perf_counter()
    tok, policy, ref = _load_policy(policy_dir, p, seed, dtype)
    value = _load_value(value_init_dir, p, dtype)
    if value.config.vocab_size != policy.config.vocab_size:  # the value model reads the policy's token ids
        raise ValueError(f"the value model ({value_init_dir}) has a vocabulary of {value.config.vocab_size} tokens, "
                         f"the policy ({policy_dir}) {policy.config.vocab_size}: they must share the tokenizer")
    accelerator = Accelerator(gradient_accumulation_steps=p.grad_accum)
    if p.gradient_checkpointing:
        for m in (policy, value):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = _policy_and_value_module()(policy, value)
    params = [x for x in module.parameters() if x.requires_grad]
    # eps 1e-5: the PPO implementation details (Huang et al.) use it instead of 1e-8.
    optimizer = torch.optim.AdamW(params, lr=p.learning_rate, eps=1e-5, weight_decay=0.0)
    total_updates = p.max_steps * p.num_ppo_epochs * p.num_mini_batches
    # Linear warmup over `warmup_steps` optimizer steps, then constant (TRL 0.19 decayed linearly to 0;
    # a constant rate keeps the first steps of a run the same whatever max_steps is).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(p.warmup_steps, total_updates))
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    if ref is not None:
        ref = ref.to(accelerator.device)
    inner = accelerator.unwrap_model(module)
    policy_lm = inner.policy.get_base_model() if p.lora.enabled else inner.policy  # LoRA layers applied
    # The engine samples exactly as every stage does; `sample_ids` gives the sampled token ids (the
    # stop token included), which the update needs and `generate` only returns as text.
    engine = EngineBackend(policy_lm, tok, batch_size=p.rollout_batch_size, show_progress=False)
    stop_ids = engine.stop_ids  # what ends a response, hence what counts as its EOS
    pad_id = pad_token_id(tok, stop_ids)
    shuffle = torch.Generator().manual_seed(seed)
    # Under `accelerate launch` each rank rolls out its own prompts and samples (data parallel);
    # gradients are averaged across ranks by the prepared module.
    # (rank offsets, not closedloop.generate.derived_seed: rank 0 keeps the one-process run's streams)
    rank = accelerator.process_index
    batches = _prompt_batches(len(prompts), p.rollout_batch_size, seed + 1_000_003 * rank)
    history: list[dict] = []
    for step in range(1, p.max_steps + 1):
        chosen = [prompts[i] for i in next(batches)]
        sampling = SamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens,
                                  seed=seed + step + 7_919 * rank)
        t0 = time.perf_counter()
        ids = [s[0] for s in engine.sample_ids(chosen, sampling)]
        texts = [make_completion(tok, out, stop_ids).text for _, out in ids]
        batch = build_batch([q for q, _ in ids], [out for _, out in ids], pad_id, stop_ids, accelerator.device)
        t1 = time.perf_counter()
        raw = [float(x) for x in reward_fn(chosen, texts)]
        if len(raw) != len(texts) or not all(math.isfinite(x) for x in raw):
            raise ValueError(f"reward_fn must return {len(texts)} finite scores, got {raw[:8]}...")
        roll = _score_rollout(module, inner, ref, batch, torch.tensor(raw, device=accelerator.device), p)
        t2 = time.perf_counter()
        stats = _update(accelerator, module, optimizer, scheduler, params, batch, roll, p, shuffle)
        t3 = time.perf_counter()
        # rollout: sampling; scoring: the reward, then log-probs, reference log-probs and values; update: PPO epochs
        timing = {"rollout_seconds": t1 - t0, "scoring_seconds": t2 - t1, "update_seconds": t3 - t2,
                  "rollout_tokens": float(batch.mask.sum())}
        metrics = {"step": step, **roll["metrics"], **stats, **timing, "lr": float(scheduler.get_last_lr()[0])}
        history.append(metrics)
        progress.report(step, p.max_steps, "steps")
        if on_step is not None:
            on_step(step, metrics)
    saved = _save(accelerator.unwrap_model(module).policy, tok, out_dir, p)
    return {"train_steps": p.max_steps, "optimizer_steps": total_updates,
            "rollouts": p.max_steps * p.rollout_batch_size,
            "history": history, "final_kl": history[-1]["kl"], "final_score": history[-1]["score"],
            "saved": saved, "train_seconds": time.perf_counter() - start}


def _score_rollout(module: Any, inner: Any, ref: Any, batch: RolloutBatch, raw_scores: Any, p: PPOParams) -> dict:
    """Old log-probs, reference log-probs, values (no grad, in micro-batches), then rewards and GAE."""
    import torch

    logp, ref_logp, values, entropy = [], [], [], []
    module.eval()
    with torch.no_grad():
        for b in range(0, batch.input_ids.shape[0], p.batch_size):
            mb = batch.rows(slice(b, b + p.batch_size))
            logits, v = module(mb)
            logp.append(logprobs_from_logits(logits, mb.responses, p.temperature))
            entropy.append(entropy_from_logits(logits, p.temperature))
            values.append(v)
            if ref is None:
                with inner.policy.disable_adapter():
                    ref_logp.append(response_logprobs(inner.policy, mb, p.temperature)[0])
            else:
                ref_logp.append(response_logprobs(ref, mb, p.temperature)[0])
    logp, ref_logp, values, entropy = (torch.cat(x) for x in (logp, ref_logp, values, entropy))
    mask = batch.mask
    kl = kl_estimate(logp, ref_logp, p.kl_estimator).where(mask, 0)
    scores = penalise_missing_eos(raw_scores.float(), batch.has_eos, p.missing_eos_penalty)
    rewards = per_token_rewards(scores, kl, batch.eos_index, p.kl_coef)
    if p.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    values = values.where(mask, 0)
    advantages, returns = gae(rewards, values, mask, p.gamma, p.lam)
    advantages = whiten(advantages, mask)
    kl_sum = kl.sum(1)
    metrics = {
        "score": raw_scores.float().mean().item(),  # the reward model's, before the missing-EOS penalty
        "reward": (scores - p.kl_coef * kl_sum).mean().item(),  # penalised score + non-score reward
        "non_score_reward": (-p.kl_coef * kl_sum).mean().item(),
        "kl": kl_sum.mean().item(),  # summed over a response's tokens, averaged over responses
        "ref_max_dev": (logp - ref_logp).abs().where(mask, 0).max().item(),
        "entropy": masked_mean(entropy, mask).item(),
        "response_length": mask.sum(1).float().mean().item(),  # tokens, EOS included
        "eos_frac": batch.has_eos.float().mean().item(),
        "value_mean": masked_mean(values, mask).item(),
    }
    return {"logp": logp, "values": values, "advantages": advantages, "returns": returns, "metrics": metrics}


def _update(accelerator: Any, module: Any, optimizer: Any, scheduler: Any, params: list, batch: RolloutBatch,
            roll: dict, p: PPOParams, gen: Any) -> dict:
    """num_ppo_epochs passes over shuffled mini-batches; one optimizer step per mini-batch."""
    import torch

    n, mini = batch.input_ids.shape[0], p.rollout_batch_size // p.num_mini_batches
    sums: dict[str, float] = {}
    count = 0
    first_dev = float("nan")
    module.train()  # dropout is 0 everywhere; train mode only matters for gradient checkpointing
    for _ in range(p.num_ppo_epochs):
        perm = torch.randperm(n, generator=gen).to(batch.input_ids.device)
        for m0 in range(0, n, mini):
            for b0 in range(m0, m0 + mini, p.batch_size):
                idx = perm[b0: b0 + p.batch_size]
                mb = batch.rows(idx)
                with accelerator.accumulate(module):
                    logits, v = module(mb)
                    new_logp = logprobs_from_logits(logits, mb.responses, p.temperature)
                    old_logp = roll["logp"][idx]
                    pl, clip_frac, approx_kl = policy_loss(new_logp, old_logp, roll["advantages"][idx], mb.mask,
                                                           p.clip)
                    vl, v_clip_frac = value_loss(v, roll["values"][idx], roll["returns"][idx], mb.mask, p.clip_value)
                    accelerator.backward(pl + p.vf_coef * vl)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, p.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                if count == 0:  # same weights as the rollout: the ratio must be exactly 1
                    first_dev = (new_logp.detach() - old_logp).exp().sub(1).abs().where(mb.mask, 0).max().item()
                for k, x in (("policy_loss", pl), ("value_loss", vl), ("clip_frac", clip_frac),
                             ("value_clip_frac", v_clip_frac), ("approx_kl", approx_kl)):
                    sums[k] = sums.get(k, 0.0) + float(x.detach())
                count += 1
    module.eval()
    return {**{k: v / count for k, v in sums.items()}, "first_ratio_max_dev": first_dev}


def _save(policy: Any, tok: Any, out_dir: Path, p: PPOParams) -> str:
    """As `common.save_trained`: merged (adapter kept in out_dir/adapter), adapter, or full; safetensors only."""
    from closedloop.feedback.common import ADAPTER_SUBDIR, normalise_adapter_config
    from closedloop.io import is_main_process

    kind = "merged" if (p.lora.enabled and p.merge) else "adapter" if p.lora.enabled else "full"
    if not is_main_process():  # only rank 0's output is kept (closedloop.io)
        return kind
    out_dir.mkdir(parents=True, exist_ok=True)
    if not p.lora.enabled:
        policy.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        return "full"
    target = out_dir / ADAPTER_SUBDIR if p.merge else out_dir
    policy.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    normalise_adapter_config(target)
    if not p.merge:
        return "adapter"
    policy.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return "merged"
