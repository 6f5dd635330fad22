"""Proxy tuning's stages (dvc.yaml `meta: {method: proxy}`): the small pair, then decoding by proxy.

    proxy_small   models/base with its `layers` most influential layers kept (block influence),
                  distilled briefly on the base's own responses: the anti-expert
                                                                        models/proxy/small
    proxy_expert  that small model after the RFT recipe (SFT on RFT's verified samples): the expert
                                                                        models/proxy/expert
    proxy_eval    the instruction-following suite decoded by proxy (base + alpha * (expert -
                  anti-expert)) at each alpha: rows of the comparison report
                  (data/eval/proxy/records.jsonl); the base alone, decoded the same way
                  (data/proxy/base_records.jsonl); gap
                  closed against the directly tuned base (eval@<proxy.tuned>), with paired
                  intervals; proxy decoding's tokens/s against the base alone
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import mlflow

from closedloop.errors import UserError
from closedloop.io import atomic_dir, read_jsonl, read_prompt_rows, write_json, write_jsonl
from closedloop.methods import proxy
from closedloop.stages.common import chat, eval_records, log_training, open_backend

MODELS = Path("models/proxy")
DATA = Path("data/proxy")
REPORT = Path("data/eval/proxy/records.jsonl")  # read by the shared compare stage


def run_small(params: Any, root: Path, key: str | None) -> None:
    from closedloop.feedback.distill import distill
    from closedloop.generate import SamplingParams
    from closedloop.models import load_model

    s = params.proxy.small
    rows = read_prompt_rows(root / s.prompts, "proxy.small.prompts", s.max_prompts)
    backend = open_backend(params, root, "models/base", params.proxy.batch_size)
    outs = backend.generate([chat(r["prompt"]) for r in rows],
                            SamplingParams(n=1, temperature=s.temperature, top_p=1.0, max_new_tokens=s.max_new_tokens,
                                           seed=params.seed))
    conversations = [chat(r["prompt"]) + [{"role": "assistant", "content": o[0].text}]
                     for r, o in zip(rows, outs) if o[0].text.strip()]
    if not conversations:
        raise UserError(f"proxy.small: the base wrote nothing for the {len(rows)} prompts of {s.prompts}")
    base, tok = load_model(root / "models/base", dtype=params.model.dtype,
                           trust_remote_code=params.model.trust_remote_code)
    enc = tok.apply_chat_template(conversations, tokenize=True, padding=True, truncation=True,
                                  max_length=s.distill.max_length, return_tensors="pt", return_dict=True)
    influence = proxy.block_influence(base, enc["input_ids"].to(base.device), enc["attention_mask"].to(base.device))
    keep = proxy.most_influential(influence, s.layers)
    small = proxy.derive_small(base, keep)
    (root / MODELS).mkdir(parents=True, exist_ok=True)
    with atomic_dir(root / MODELS / "small") as tmp:
        metrics = distill(small, base, tok, conversations, tmp, s.distill.value(), beta=s.kd_beta,
                          temperature=s.kd_temperature, seed=params.seed, dtype=params.model.dtype)
    metrics |= {"layers": len(keep), "base_layers": base.config.num_hidden_layers,
                "parameters": sum(p.numel() for p in small.parameters()), "distill_examples": len(conversations)}
    log_training(metrics, root / DATA / "small_metrics.json")
    write_json(root / DATA / "small_layers.json", {"kept": keep, "block_influence": [round(x, 6) for x in influence]})


def run_expert(params: Any, root: Path, key: str | None) -> None:
    from closedloop.feedback.sft import train_sft
    from closedloop.methods.rft import sft_examples

    kept = read_jsonl(root / "data/rft/sft.jsonl")
    if not kept:
        raise UserError("data/rft/sft.jsonl: no verified samples to tune the expert on (see rft.threshold)")
    with atomic_dir(root / MODELS / "expert") as tmp:
        metrics = train_sft(root / MODELS / "small", sft_examples(kept), tmp, params.proxy.expert_sft.value(),
                            seed=params.seed, dtype=params.model.dtype)
    log_training(metrics, root / DATA / "expert_metrics.json")



def _load(params: Any, root: Path, location: str) -> tuple[Any, Any]:
    """A checkpoint directory of this project (or anywhere), or a hub id (HF_HUB_OFFLINE=0)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from closedloop.models import load_model

    path = root / location
    if path.is_dir():
        return load_model(path, dtype=params.model.dtype, trust_remote_code=params.model.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=params.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, params.model.dtype),
                                                     trust_remote_code=params.model.trust_remote_code,
                                                     use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"proxy: cannot load {location!r} (not a directory here, nor a reachable hub id): "
                        f"{str(e).splitlines()[0]}") from None
    return (model.to("cuda") if torch.cuda.is_available() else model).eval(), tok


def _strict(record: dict) -> float:
    passed, total = record["scores"]["prompt_level_strict"]
    return passed / total


def _tuned_strict(root: Path, name: str, keys: list[str]) -> list[float]:
    by_key = eval_records(root, name, "instruction_following", "proxy")
    if missing := [k for k in keys if k not in by_key]:
        raise UserError(f"proxy: data/eval/{name}/records.jsonl lacks {len(missing)} of the held-out prompts "
                        f"(rerun eval@{name})")
    return [_strict(by_key[k]) for k in keys]


def _tokens_per_second(backend: Any, prompts: list, tokens: int, seed: int) -> float:
    from closedloop.generate import SamplingParams

    start = time.perf_counter()
    outs = backend.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=tokens, seed=seed))
    return sum(o[0].num_tokens for o in outs) / (time.perf_counter() - start)


def run_eval(params: Any, root: Path, key: str | None) -> None:
    from closedloop.engine.proxy import check_vocabularies
    from closedloop.evaluate.suites import get_suite
    from closedloop.backends import make_backend

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # three models' loading bars would bury a one-line error
    p = params.proxy
    trio = proxy.ProxyConfig.trio(p)
    suite = get_suite("instruction_following")
    examples = suite.load(params, root)  # bad input fails before three models load
    loaded = {role: _load(params, root, trio[role]) for role in proxy.ROLES}
    check_vocabularies([f"proxy {r} ({trio[r]})" for r in proxy.ROLES], [loaded[r][1] for r in proxy.ROLES],
                       [loaded[r][0] for r in proxy.ROLES])
    models, tok = [loaded[r][0] for r in proxy.ROLES], loaded["base"][1]
    templates = [p.templates.get(r, "chat") == "chat" for r in proxy.ROLES]
    records, metrics = [], {}
    keys = [str(r["key"]) for r in examples]
    # The base alone, decoded here as the proxy rows are (its template, this batch size), not read
    # from eval@<evaluate.reference>: proxy.base may name another model than the reference's.
    base_alone = make_backend("engine", models[0], tok, templates=templates[:1], batch_size=p.batch_size,
                              show_progress=False)
    base_records = suite.run(params, examples, base_alone)
    base = [_strict(r) for r in base_records]
    tuned = _tuned_strict(root, p.tuned, keys)
    metrics["base/prompt_level_strict"] = sum(base) / len(base)
    # every alpha in one batch: the held-out prompts once per alpha, each copy steered by its own
    # (`alphas` says there is one expert pair; `per_prompt` gives each prompt's alpha for it)
    backend = make_backend("proxy", models, tok, alphas=p.alphas[:1], templates=templates,
                           batch_size=p.batch_size, show_progress=False,
                           per_prompt=[[a] for a in p.alphas for _ in examples])
    swept = suite.run(params, examples * len(p.alphas), backend)
    for i, alpha in enumerate(p.alphas):
        name = proxy.row_name(alpha)
        rows = [{**r, "model": name} for r in swept[i * len(examples) : (i + 1) * len(examples)]]
        records += rows
        strict = [_strict(r) for r in rows]
        gap = proxy.gap_closed(base, tuned, strict)
        metrics |= {f"{name}/gap_closed": gap["value"], f"{name}/gap_closed_ci_low": gap["ci_low"],
                    f"{name}/gap_closed_ci_high": gap["ci_high"], f"{name}/gap_closed_bounded": gap["bounded"],
                    f"{name}/prompt_level_strict": sum(strict) / len(strict)}
        metrics["tuned_gain"] = gap["tuned_gain"]
    # decoding speed on the same prompts: the base alone, then by proxy (three forwards a token)
    prompts = [chat(r["prompt"]) for r in examples[: p.speed_prompts]]
    alone = _tokens_per_second(base_alone, prompts, p.speed_tokens, params.seed)
    both = _tokens_per_second(make_backend("proxy", models, tok, alphas=[p.alphas[0]], templates=templates,
                                           batch_size=p.batch_size, show_progress=False),
                              prompts, p.speed_tokens, params.seed)
    metrics |= {"base_tokens_per_second": alone, "proxy_tokens_per_second": both, "proxy_speed_ratio": both / alone}
    write_jsonl(root / REPORT, records)
    write_jsonl(root / DATA / "base_records.jsonl", [{**r, "model": trio["base"]} for r in base_records])
    # gap closed is undefined when the directly tuned model gained nothing, and its interval unbounded
    # when that gain is not clear of 0: null in the metrics file (write_json), not logged to MLflow
    write_json(root / DATA / "eval_metrics.json", metrics)
    mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    mlflow.set_tags({f"closedloop.proxy_{r}": trio[r] for r in proxy.ROLES})  # the models this configuration resolved to


STAGES = {"proxy_small": run_small, "proxy_expert": run_expert, "proxy_eval": run_eval}
