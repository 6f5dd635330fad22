"""Tree-search refinement: prefill tokens and generation speed with vs without prefix reuse.

SPAR's refiner writes `n` children from the same (long) refine prompt. Without prefix reuse,
`generate(num_return_sequences=n)` prefills that prompt n times; with it (HFBackend's default
`share_prefix=True`) each prompt is prefilled once and its KV cache is repeated for the n children.
Target: prefill tokens with reuse <= 0.5x those without. Generation tokens/s is generated tokens
over the whole `generate` wall time (prefill included), so it shows what the saved prefill buys.

Run by hand, never asserted in tests:
    .venv/bin/python bench/bench_prefix_reuse.py --model models/base --prompts 8 --n 3
Prints a small table, then one JSON line (last line) for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only; never reach for the hub

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from closedloop.generate import SamplingParams
from closedloop.hf_backend import HFBackend

INSTRUCTIONS = [
    "Write a short product description for a reusable water bottle. Use exactly three bullet points and "
    "do not use the word 'plastic'.",
    "Explain how a hash table handles collisions. Answer in two paragraphs and end with the phrase "
    "'Is there anything else I can help with?'.",
    "Write a limerick about a cat who learns to code. The whole response must be in lowercase letters.",
    "Summarise the causes of the French revolution for a high-school student in fewer than 120 words, "
    "and wrap the entire response in double quotation marks.",
    "Give three tips for staying focused while studying. Include the keywords 'timer' and 'breaks', and "
    "write a title wrapped in double angular brackets, such as <<title>>.",
    "Describe the water cycle. Your answer must contain at least two placeholders in square brackets, "
    "like [location], and must not contain any commas.",
    "Write a polite email declining a meeting invitation. End with a postscript starting with P.S.",
    "List the planets of the solar system in order, as a numbered list, in English and in capital letters only.",
]
RESPONSES = [
    "Stay hydrated wherever life takes you. Our bottle keeps drinks cold for twenty-four hours and hot for "
    "twelve, thanks to double-walled steel. It is light, leak-proof and fits in every cup holder. The wide "
    "mouth makes it easy to add ice or clean by hand, and the lid clips onto a backpack strap so it never "
    "gets lost on the trail. Choose from six colours and make it your own with a custom engraving.",
    "A hash table maps each key to a bucket through a hash function, but two different keys can land in the "
    "same bucket. One common fix is chaining: each bucket holds a small list, and lookups scan that list. "
    "Another is open addressing, where a colliding key probes other slots (linearly, quadratically or with "
    "a second hash) until it finds an empty one. Both keep operations fast on average if the load factor "
    "stays low, which is why tables resize when they fill up.",
    "There once was a cat named Lucille, who typed with remarkable zeal. She debugged through the night, "
    "fixed each off-by-one fight, and shipped her first app with a squeal. Her owner was shocked and amazed.",
]
CRITIQUE = (
    "Here is a response to the instruction above:\n\n{response}\n\n"
    "First, critique the response: list every way it fails to follow the instruction exactly (format, "
    "length, required words, forbidden words, casing, punctuation) and anything unclear or incorrect. "
    "Then write an improved response that fixes all of these problems while keeping what was good. "
    "Format your answer as:\nCritique: <your critique>\nRefined response: <the improved response>"
)


def make_refine_prompts(n: int) -> list[list[dict]]:
    """Long refine-style chat prompts (instruction + response + critique request), deterministic."""
    out = []
    for i in range(n):
        instruction = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        response = RESPONSES[i % len(RESPONSES)]
        out.append([
            {"role": "system", "content": "You are a careful editor who checks responses against instructions."},
            {"role": "user", "content": f"Instruction:\n{instruction}\n\n" + CRITIQUE.format(response=response)},
        ])
    return out


def run(model, tokenizer, prompts, params: SamplingParams, batch_size: int, share: bool) -> dict:
    backend = HFBackend(model, tokenizer, batch_size=batch_size, show_progress=False, share_prefix=share)
    backend.generate(prompts[:1], SamplingParams(n=params.n, max_new_tokens=2))  # warm-up: first-call overheads
    warm = dict(backend.stats)
    out = backend.generate(prompts, params)
    d = {k: backend.stats[k] - warm[k] for k in backend.stats}
    return {
        "prefill_tokens": int(d["prefill_tokens"]),
        "prompt_tokens": int(d["prompt_tokens"]),
        "generated_tokens": int(d["generated_tokens"]),
        "seconds": round(d["seconds"], 3),
        "gen_tok_per_s": round(d["generated_tokens"] / d["seconds"], 2) if d["seconds"] > 0 else None,
        "texts": [[c.text for c in comps] for comps in out],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base", help="local HF model dir (default: models/base)")
    ap.add_argument("--prompts", type=int, default=8, help="tree nodes being refined")
    ap.add_argument("--n", type=int, default=3, help="children (samples) per node")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=12, help="sequences per batch (prompts x n)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    path = Path(args.model)
    if not (path / "config.json").exists():
        sys.exit(f"no model at {path}; materialise the base model first with: closedloop stage base "
                 "(or: dvc repro base)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if torch.cuda.is_available():
        model = model.to("cuda")
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    prompts = make_refine_prompts(args.prompts)

    plain = run(model, tokenizer, prompts, params, args.batch_size, share=False)
    shared = run(model, tokenizer, prompts, params, args.batch_size, share=True)
    ratio = shared["prefill_tokens"] / plain["prefill_tokens"]
    same = sum(a == b for a, b in zip(plain.pop("texts"), shared.pop("texts")))

    avg_prompt = plain["prompt_tokens"] / (args.prompts * args.n)
    print(f"model={path} prompts={args.prompts} n={args.n} max_new_tokens={args.max_new_tokens} "
          f"batch_size={args.batch_size} T={args.temperature} top_p={args.top_p} "
          f"avg_prompt_tokens={avg_prompt:.0f} threads={torch.get_num_threads()} device={model.device}")
    print(f"{'mode':<14}{'prefill':>10}{'gen tok':>10}{'seconds':>10}{'gen tok/s':>11}")
    for name, r in (("no reuse", plain), ("prefix reuse", shared)):
        print(f"{name:<14}{r['prefill_tokens']:>10}{r['generated_tokens']:>10}{r['seconds']:>10.2f}"
              f"{r['gen_tok_per_s']:>11.1f}")
    print(f"prefill ratio (reuse / no reuse): {ratio:.3f} (target <= 0.5) {'OK' if ratio <= 0.5 else 'MISSED'}")
    print(f"wall speedup: {plain['seconds'] / shared['seconds']:.2f}x; prompts with identical samples: "
          f"{same}/{args.prompts}")
    print(json.dumps({
        "model": str(path), "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "temperature": args.temperature, "top_p": args.top_p,
        "threads": torch.get_num_threads(), "device": str(model.device), "avg_prompt_tokens": round(avg_prompt, 1),
        "no_reuse": plain, "prefix_reuse": shared, "prefill_ratio": round(ratio, 4),
        "target_met": ratio <= 0.5, "wall_speedup": round(plain["seconds"] / shared["seconds"], 3),
        "identical_prompts": same,
    }))


if __name__ == "__main__":
    main()
