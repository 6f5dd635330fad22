"""The engine vs HF's batched generate vs one prompt at a time: generated tokens per second.

Same prompts, same sampling params, same batch size, one run side by side, for each dtype asked:
    .venv/bin/python bench/bench_generate.py --model models/base --prompts 32 --max-new-tokens 64 \
        --dtypes float32 bfloat16
Run alone (two torch processes on 2 cores slow each other 5-10x); never asserted in tests.
Prints a table per dtype, then one JSON line (last line) for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only; never reach for the hub

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from closedloop.backends import make_backend
from closedloop.generate import SamplingParams, render_prompt
from closedloop.hf_backend import HFBackend

TOPICS = ["prime numbers", "the water cycle", "a haiku about autumn", "binary search", "photosynthesis",
          "the French revolution", "how vaccines work", "a limerick about a cat", "recursion", "black holes",
          "compound interest", "the rules of chess", "why the sky is blue", "a packing list for camping"]
TEMPLATES = ["Explain {} in one paragraph.", "Write {}.", "Give three facts about {}.",
             "Summarise {} for a ten-year-old, in detail, using an example and a short analogy at the end.",
             "{}?"]


def make_prompts(n: int) -> list[list[dict]]:
    """Varied chat prompts (different lengths, some with a system turn), deterministic."""
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": TEMPLATES[i % len(TEMPLATES)].format(TOPICS[i % len(TOPICS)])}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You are a concise, helpful assistant."})
        out.append(msgs)
    return out


def sequential(model, tokenizer, prompts, params: SamplingParams, stop_ids: list[int]) -> tuple[int, float]:
    """Plain `model.generate`, one prompt (x n samples) at a time; returns (generated tokens, seconds)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    kw = dict(max_new_tokens=params.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad)
    if params.temperature == 0:
        kw.update(do_sample=False)
    else:
        kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0,
                  num_return_sequences=params.n)
    torch.manual_seed(params.seed)
    stops, tokens = set(stop_ids), 0
    start = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tokenizer.encode(render_prompt(tokenizer, p), add_special_tokens=False)])
            seqs = model.generate(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device), **kw)
            for row in seqs[:, ids.shape[1]:].tolist():
                tokens += next((i for i, t in enumerate(row) if t in stops), len(row))
    # Greedy decodes once per prompt (n identical copies), matching what HFBackend computes and counts.
    return tokens, time.perf_counter() - start


def timed(backend, prompts, params: SamplingParams) -> tuple[int, float]:
    """(generated tokens, seconds) of one generate call, after a warm-up call."""
    backend.generate(prompts[:1], SamplingParams(max_new_tokens=2))  # first-call overheads
    tok, sec = backend.stats["generated_tokens"], backend.stats["seconds"]
    backend.generate(prompts, params)
    return backend.stats["generated_tokens"] - tok, backend.stats["seconds"] - sec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base", help="local HF model dir (default: models/base)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--sequential-prompts", type=int, default=8,
                    help="prompts for the one-at-a-time baseline (tok/s is per token, so fewer suffice)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n", type=int, default=1, help="completions per prompt")
    ap.add_argument("--greedy", action="store_true", help="temperature 0 (default: sample at T=0.8, top_p=0.95)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="weights dtypes (bfloat16 pays only on CPUs with native bf16 matmuls)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = Path(args.model)
    if not (path / "config.json").exists():
        sys.exit(f"no model at {path}; materialise the base model first with: closedloop stage base")
    tokenizer = AutoTokenizer.from_pretrained(path)
    params = SamplingParams(n=args.n, temperature=0.0 if args.greedy else 0.8, top_p=0.95,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    prompts = make_prompts(args.prompts)
    print(f"model={path} prompts={args.prompts} n={args.n} max_new_tokens={args.max_new_tokens} "
          f"batch_size={args.batch_size} {'greedy' if args.greedy else 'T=0.8 top_p=0.95'} "
          f"threads={torch.get_num_threads()}")
    results = {}
    for dtype in args.dtypes:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        rows = {}
        for name in ("engine", "hf"):
            backend = make_backend(name, model, tokenizer, batch_size=args.batch_size, show_progress=False)
            rows[name] = timed(backend, prompts, params)
        rows["one at a time"] = sequential(model, tokenizer, prompts[: args.sequential_prompts], params,
                                           HFBackend(model, tokenizer).stop_ids)
        tps = {k: t / s for k, (t, s) in rows.items()}
        print(f"\n{dtype}\n{'mode':<16}{'tokens':>8}{'seconds':>10}{'tok/s':>10}")
        for k, (t, sec) in rows.items():
            print(f"{k:<16}{t:>8}{sec:>10.2f}{tps[k]:>10.1f}")
        print(f"engine vs hf batched: {tps['engine'] / tps['hf']:.2f}x; "
              f"engine vs one at a time: {tps['engine'] / tps['one at a time']:.2f}x; "
              f"hf batched vs one at a time: {tps['hf'] / tps['one at a time']:.2f}x")
        results[dtype] = {k: {"tokens": t, "seconds": round(sec, 3), "tok_per_s": round(tps[k], 2)}
                          for k, (t, sec) in rows.items()}
    print(json.dumps({"model": str(path), "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                      "batch_size": args.batch_size, "greedy": args.greedy, "threads": torch.get_num_threads(),
                      "results": results}))


if __name__ == "__main__":
    main()
