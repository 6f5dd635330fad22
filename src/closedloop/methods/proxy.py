"""Proxy tuning (Liu et al. 2024, "Tuning Language Models by Proxy") as a recipe over plain rows.

A small model is tuned (the expert) beside its untuned twin (the anti-expert); a large base model
is steered at decode time, its weights untouched. At every step, on the raw next-token logits:

    logits = base(x) + alpha * (expert(x) - anti_expert(x))

then temperature and top-p (the engine's sampler, after the arithmetic, in float32). Each model
keeps its own KV cache and sees the prompt in its own view (`templates`: the expert its chat
template, base and anti-expert the raw prompt, as the reference code does); all share the base's
tokenizer (a different vocabulary is an error; a vocabulary padded past the tokenizer, as many
checkpoints pad it, is cut to the shared size). EFT (Mitchell et al. 2023) is alpha = 1; DeRa /
ExPO extrapolate within one model size (base = anti-expert, alpha > 1: `configuration: extrapolate`).

    search    decoding with the combined logits (the engine's multi-model decode, batched)
    verify    none
    feedback  the logit arithmetic itself (no weights change)

Only one model size ships offline, and with anti-expert = base, alpha = 1 reproduces the expert
exactly (a "gap closed" of 100% by construction). So the default (`configuration: small_pair`)
derives a real small pair from the embedded model: `proxy_small` keeps `layers` of the base's
layers, dropping those that change their input least (block influence, ShortGPT: Men et al. 2024),
and distils it briefly on the base's own generations (the anti-expert); `proxy_expert`
tunes that small model with the RFT recipe (SFT on RFT's verified samples, data/rft/sft.jsonl);
the base is the full embedded model; the directly tuned base is RFT's model. Gap closed =
(proxy - base) / (directly tuned - base) on the shared evaluation.

The stages (stages/proxy.py) read and write files; everything here is rows and tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from closedloop.config import FieldError, LoraParams, SFTParams, TrainParams, bounds
from closedloop.errors import UserError

ROLES = ("base", "expert", "anti_expert")


@dataclass
class ProxySmallParams:
    # layers kept of the base's, by block influence (1 - cos(layer input, layer output) on the
    # distillation texts; the least influential are dropped). On SmolLM2-135M, before distillation,
    # NLL on the base's own responses (the base's 1.87): 15 of 30 kept 5.95, 20 kept 4.01; evenly
    # spaced layers instead 12.7 and 9.95 (python bench/bench_proxy.py --layers 10 12 15 20).
    # 15 keeps the demo's three-model decoding within budget (the small pair is 2/3 of its compute at 20).
    layers: int = field(default=15, metadata=bounds(ge=1, le=4096))
    prompts: str = field(default="data/suite/train.jsonl", metadata=bounds(path=True))  # distillation prompts
    max_prompts: int = field(default=16, metadata=bounds(ge=1))
    max_new_tokens: int = field(default=64, metadata=bounds(ge=1, le=100_000))  # the base's responses
    temperature: float = field(default=0.7, metadata=bounds(ge=0.0, le=10.0))
    # distillation (feedback/distill.py): the small model matches the base's next-token distribution
    # on its responses; every weight is trained (the layers kept must re-learn to work without the
    # ones dropped; LoRA's few parameters cannot), so `distill.lora` must stay disabled
    distill: TrainParams = field(default_factory=lambda: TrainParams(learning_rate=2e-4, epochs=1.0, batch_size=8,
                                                                     lora=LoraParams(enabled=False)))
    kd_beta: float = field(default=0.0, metadata=bounds(ge=0.0, le=1.0))  # generalised JSD: 0 forward KL, 1 reverse
    kd_temperature: float = field(default=1.0, metadata=bounds(gt=0.0, le=10.0))

    def __post_init__(self) -> None:
        if self.distill.lora.enabled:
            raise FieldError("distill.lora.enabled", "expected false (distillation trains every weight)")


@dataclass
class ProxyConfig:
    # small_pair: base = models/base, expert = models/proxy/expert, anti-expert = models/proxy/small |
    # extrapolate: one size, base = anti-expert = models/base, expert = the directly tuned models/rft,
    # alpha > 1 (DeRa / ExPO). `base` / `expert` / `anti_expert` override either (a checkpoint
    # directory, or a hub id with HF_HUB_OFFLINE=0).
    configuration: Literal["small_pair", "extrapolate"] = "small_pair"
    base: str | None = None
    expert: str | None = None
    anti_expert: str | None = None
    alphas: list[float] = field(default_factory=lambda: [0.5, 1.0])  # one report row per alpha
    # per model: chat (its chat template) or raw (the prompt's text, no template)
    templates: dict[str, str] = field(default_factory=lambda: {"base": "chat", "expert": "chat",
                                                               "anti_expert": "chat"})
    tuned: str = field(default="rft", metadata=bounds(model_name=True))  # the evaluate.models entry of the directly tuned base (gap closed's denominator)
    small: ProxySmallParams = field(default_factory=ProxySmallParams)
    # the expert: the small model after the RFT recipe (LoRA SFT on RFT's verified samples, RFT's
    # settings but one epoch, for the demo's time)
    expert_sft: SFTParams = field(default_factory=lambda: SFTParams(learning_rate=6e-4, epochs=1.0))
    speed_prompts: int = field(default=8, metadata=bounds(ge=1))  # tokens/s: proxy vs the base alone
    speed_tokens: int = field(default=32, metadata=bounds(ge=1, le=100_000))
    # rows per forward; proxy_eval decodes every alpha's copy of the held-out prompts in one call
    batch_size: int = field(default=96, metadata=bounds(ge=1, le=4096))

    def __post_init__(self) -> None:
        if not self.alphas:
            raise FieldError("alphas", "expected a non-empty list of numbers")
        if bad := sorted(set(self.templates) - set(ROLES)):
            raise FieldError("templates", f"expected keys among {', '.join(ROLES)}, got {bad}")
        if bad := sorted({v for v in self.templates.values()} - {"chat", "raw"}):
            raise FieldError("templates", f"expected values chat or raw, got {bad}")

    def trio(self) -> dict[str, str]:
        """{role: model location} of this configuration (overrides applied)."""
        if self.configuration == "extrapolate":
            chosen = {"base": "models/base", "expert": "models/rft", "anti_expert": "models/base"}
        else:
            chosen = {"base": "models/base", "expert": "models/proxy/expert", "anti_expert": "models/proxy/small"}
        return {r: getattr(self, r) or chosen[r] for r in ROLES}


CONFIG = ProxyConfig


def row_name(alpha: float) -> str:
    return f"proxy-a{alpha:g}"


def block_influence(model: Any, input_ids: Any, attention_mask: Any) -> list[float]:
    """Per layer, 1 - the mean cosine similarity of its input and output hidden states over the real
    tokens (ShortGPT's block influence): how much the layer changes what flows through it."""
    import torch

    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    real = attention_mask.bool()
    return [1.0 - torch.nn.functional.cosine_similarity(hidden[i][real].float(), hidden[i + 1][real].float(),
                                                        dim=-1).mean().item() for i in range(len(hidden) - 1)]


def most_influential(influence: Sequence[float], n: int) -> list[int]:
    """The indices of the `n` most influential layers, in model order (ties: the earlier layer)."""
    if not 1 <= n <= len(influence):
        raise UserError(f"params.yaml: proxy.small.layers: expected 1 to {len(influence)} (the base's layers), got {n}")
    return sorted(sorted(range(len(influence)), key=lambda i: (-influence[i], i))[:n])


def derive_small(model: Any, keep: Sequence[int]) -> Any:
    """A shallower copy of `model` with the layers `keep` (in order) and their weights, and the same
    embeddings, final norm and output layer (so the same tokenizer and vocabulary)."""
    import copy
    import re

    from transformers import AutoModelForCausalLM

    keep = list(keep)
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    small = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    state = {}
    for name, value in model.state_dict().items():
        m = re.match(r"(.*\.layers\.)(\d+)(\..*)", name)
        if m is None:
            state[name] = value
        elif int(m[2]) in keep:
            state[f"{m[1]}{keep.index(int(m[2]))}{m[3]}"] = value
    small.load_state_dict(state, strict=True)
    return small


def gap_closed(base: Sequence[float], tuned: Sequence[float], proxy: Sequence[float]) -> dict[str, float]:
    """(proxy - base) / (tuned - base) over the same examples, with Fieller's 95% confidence set
    for a ratio of paired means: the ratios r for which the mean of (proxy - base) - r (tuned - base)
    is within t standard errors of 0 (t: Student's, n - 1 degrees of freedom). Written here because
    no library has it; a bootstrap of the ratio must drop (or mishandle) the resamples in which the
    tuned model gains nothing, which hides exactly the case where the gap is not identified. The set
    is an interval only when the tuned model's gain is itself clear of 0 (`bounded` 1); otherwise it
    is unbounded (the whole line, or two rays around an excluded stretch), reported as -inf/+inf.
    `defined` is 0 when the tuned model's gain is 0."""
    import numpy as np
    from scipy.stats import t as student

    b, t, p = (np.asarray(v, dtype=float) for v in (base, tuned, proxy))
    x, y = p - b, t - b  # each example's proxy gain and tuned gain
    n = len(x)
    mx, my = x.mean(), y.mean()
    value = float(mx / my) if my != 0 else float("nan")
    lo, hi, bounded = float("-inf"), float("inf"), 0.0
    if n >= 2:  # one example has no standard error: nothing is ruled out
        q = float(student.ppf(0.975, n - 1))
        cov = np.cov(x, y, ddof=1) / n  # the two means' variances and covariance
        # (mx - r my)^2 <= q^2 (vxx - 2 r vxy + r^2 vyy), as a r^2 + b r + c <= 0
        a = my**2 - q**2 * cov[1, 1]
        bq = -2 * (mx * my - q**2 * cov[0, 1])
        c = mx**2 - q**2 * cov[0, 0]
        if a > 0:  # the ratio estimate satisfies the inequality, so the roots are real (up to rounding)
            root = float(np.sqrt(max(bq**2 - 4 * a * c, 0.0)))
            lo, hi, bounded = (-bq - root) / (2 * a), (-bq + root) / (2 * a), 1.0
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), "bounded": bounded, "tuned_gain": float(my),
            "proxy_gain": float(mx), "defined": float(my != 0)}
