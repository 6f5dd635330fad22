"""k-sample GRM judging: k judgments of one example in one call (sharing prefills) against k
independent calls.

Both run `closedloop.verifiers.grm.judge` as SPCT's stages do (principles + critique scaffold on
the engine, scores by label scoring, responses shuffled per sample):
    shared       one call with n=k: samples with the same response order have the same prompt,
                 which the engine prefills once; the scaffold's headers are fed as forced tokens
                 (no re-encoding); the score reading prefills the judging request once per batch
    independent  k calls with n=1: each prefills its prompt itself, and reads its scores alone

    .venv/bin/python bench/bench_grm_judging.py --model models/base --k 8
Prints generated tokens, prefill tokens (generation only), wall seconds and generated tokens/s
(wall time includes the score reading) for both, on the first held-out SPCT example
(data/spct/eval.jsonl) or a built-in pair. Run alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from closedloop.engine import EngineBackend
    from closedloop.models import load_model
    from closedloop.verifiers.grm import judge

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/base"))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-chars", type=int, default=240)
    ap.add_argument("--principles-tokens", type=int, default=24)
    ap.add_argument("--critique-tokens", type=int, default=32)
    args = ap.parse_args()
    path = ROOT / "data/spct/eval.jsonl"
    ex = (json.loads(path.read_text().splitlines()[0]) if path.is_file() else
          {"prompt": "Answer in all lowercase: what is the capital of France?",
           "responses": ["the capital of france is paris.", "The capital of France is Paris."], "best": 0})
    model, tok = load_model(Path(args.model))
    kw = dict(temperature=0.5, top_p=1.0, principles_tokens=args.principles_tokens,
              critique_tokens=args.critique_tokens, principles=True, score_mode="labels",
              max_chars=args.max_chars, batch_size=32)
    results = {}
    for mode in ("shared", "independent"):
        backend = EngineBackend(model, tok, batch_size=32, show_progress=False)
        start = time.perf_counter()
        if mode == "shared":
            judgments = judge(backend, [ex], n=args.k, seed=0, **kw)[0]
        else:
            judgments = [judge(backend, [ex], n=1, seed=s, **kw)[0][0] for s in range(args.k)]
        wall = time.perf_counter() - start
        tokens = sum(j.num_tokens for j in judgments)
        results[mode] = {"k": args.k, "generated_tokens": tokens, "prefill_tokens": backend.stats["prefill_tokens"],
                         "seconds": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
                         "seconds_per_judgment": round(wall / args.k, 2)}
        print(f"{mode:12s} k={args.k}: {tokens} tokens, {backend.stats['prefill_tokens']:.0f} prefill tokens, "
              f"{wall:.1f} s ({tokens / wall:.1f} tok/s, {wall / args.k:.2f} s per judgment)", flush=True)
    print(f"speedup {results['independent']['seconds'] / results['shared']['seconds']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
