"""Proxy decoding tokens/s: against the base alone, against the three models one prompt at a time
without batching (as the reference implementation decodes), and against the sum of the three
models' plain decode times.

    .venv/bin/python bench/bench_proxy.py --base models/base --expert models/proxy/expert \\
        --anti-expert models/proxy/small --prompts 16 --max-new-tokens 48
Greedy, float32, alpha 1. Run alone on the machine. Prints a table and one JSON line.

    .venv/bin/python bench/bench_proxy.py --layers 10 15 20
instead measures proxy_small's choice of layers: for each count, the NLL (nats per response token)
of models/base cut to its most influential layers (block influence) and to evenly spaced ones,
before any distillation, on the base's own responses (data/rft/samples.jsonl), beside the base's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unbatched(models, tok, prompts, max_new_tokens: int, stop_ids: list[int]) -> int:
    """The reference's loop: one prompt at a time, three cached forwards per token, greedy."""
    import torch

    from closedloop.engine.proxy import proxy_combine
    from closedloop.generate import encode_prompt

    combine = proxy_combine([1.0])
    tokens = 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([encode_prompt(tok, p)])
            outs = [m(input_ids=ids, use_cache=True) for m in models]
            caches = [o.past_key_values for o in outs]
            logits = [o.logits[:, -1] for o in outs]
            for _ in range(max_new_tokens):
                nxt = int(combine(logits, [0]).argmax(-1))
                if nxt in stop_ids:
                    break
                tokens += 1
                x = torch.tensor([[nxt]])
                outs = [m(input_ids=x, past_key_values=c, use_cache=True) for m, c in zip(models, caches)]
                logits = [o.logits[:, -1] for o in outs]
    return tokens


def layer_nll(base_dir: Path, counts: list[int], n: int) -> None:
    """NLL on the base's responses of the base cut to `counts` layers, by influence and evenly."""
    import torch

    from closedloop.io import read_jsonl
    from closedloop.methods import proxy
    from closedloop.models import load_model

    base, tok = load_model(base_dir)
    rows = [r for r in read_jsonl(ROOT / "data/rft/samples.jsonl") if r["sample_idx"] == 0][:n]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                       add_generation_prompt=True, return_dict=False) for r in rows]
    full = [p + tok.encode(r["response"], add_special_tokens=False) for p, r in zip(prompts, rows)]
    width = max(map(len, full))
    ids = torch.tensor([f + [tok.pad_token_id] * (width - len(f)) for f in full])
    mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
    labels = ids.clone()
    for i, (p, f) in enumerate(zip(prompts, full)):
        labels[i, : len(p)] = -100
        labels[i, len(f):] = -100

    def nll(model) -> float:
        with torch.no_grad():
            return round(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss), 2)

    influence = proxy.block_influence(base, ids, mask)
    total = len(influence)
    out = {"base": {"layers": total, "nll": nll(base)}}
    for k in counts:
        evenly = sorted({round(i * (total - 1) / max(k - 1, 1)) for i in range(k)})
        out[f"influence-{k}"] = {"layers": k, "nll": nll(proxy.derive_small(base, proxy.most_influential(influence, k)))}
        out[f"evenly-{k}"] = {"layers": len(evenly), "nll": nll(proxy.derive_small(base, evenly))}
    for name, r in out.items():
        print(f"{name:14s} {r['layers']:>3} layers  NLL {r['nll']:6.2f}")
    print(json.dumps(out))


def main() -> None:
    from closedloop.backends import make_backend
    from closedloop.generate import SamplingParams
    from closedloop.io import read_jsonl
    from closedloop.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(ROOT / "models/base"))
    ap.add_argument("--expert", default=str(ROOT / "models/proxy/expert"))
    ap.add_argument("--anti-expert", default=str(ROOT / "models/proxy/small"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, nargs="+", help="measure proxy_small's layer counts instead (NLL)")
    ap.add_argument("--texts", type=int, default=24, help="with --layers: the base's responses scored")
    args = ap.parse_args()
    if args.layers:
        return layer_nll(Path(args.base), args.layers, args.texts)
    loaded = [load_model(Path(p)) for p in (args.base, args.expert, args.anti_expert)]
    models, tok = [m for m, _ in loaded], loaded[0][1]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in read_jsonl(ROOT / "data/suite/eval.jsonl")][: args.prompts]
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    rows = {}

    def timed(name, backend):
        start = time.perf_counter()
        outs = backend.generate(prompts, sp)
        secs = time.perf_counter() - start
        rows[name] = {"tokens": sum(o[0].num_tokens for o in outs), "seconds": round(secs, 2)}
        return backend

    proxy = timed("proxy (engine, batched)", make_backend("proxy", models, tok, alphas=[1.0], batch_size=64,
                                                          show_progress=False))
    for name, m in zip(("base alone", "expert alone", "anti-expert alone"), models):
        timed(name, make_backend("engine", m, tok, batch_size=64, show_progress=False))
    start = time.perf_counter()
    n = unbatched(models, tok, prompts, args.max_new_tokens, proxy.stop_ids)
    rows["proxy, one prompt at a time, unbatched"] = {"tokens": n, "seconds": round(time.perf_counter() - start, 2)}
    plain = ("base alone", "expert alone", "anti-expert alone")
    three = sum(rows[k]["seconds"] for k in plain)
    for r in rows.values():
        r["tok_per_s"] = round(r["tokens"] / r["seconds"], 1)
    print(f"{'decoding':40s} {'tokens':>7} {'seconds':>8} {'tok/s':>7}")
    for k, r in rows.items():
        print(f"{k:40s} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tok_per_s']:>7.1f}")
    p = rows["proxy (engine, batched)"]
    print(f"proxy vs base alone: {p['seconds'] / rows['base alone']['seconds']:.2f}x the time; "
          f"vs the sum of the three plain decodes ({three:.1f} s): {p['seconds'] / three:.2f}x; "
          f"vs unbatched: {rows['proxy, one prompt at a time, unbatched']['seconds'] / p['seconds']:.1f}x faster")
    print(json.dumps(rows | {"sum_of_three_plain_seconds": round(three, 2)}))


if __name__ == "__main__":
    main()
