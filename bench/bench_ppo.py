"""PPO step time split into rollout, scoring and update; rollout tokens/s against plain sampling.

Runs the project's PPO (feedback/ppo.py) with params.yaml's `rlhf.policy.ppo` section (demo size)
from the SFT model against the reward model, into a temporary directory, and prints per step:
    rollout   the engine sampling the responses through the LoRA-wrapped policy
    scoring   the reward model, then the policy's, the reference's and the value model's forwards
    update    num_ppo_epochs passes of PPO over the rollout (policy + value, backward, AdamW)
Then the same prompts sampled by the engine from the plain SFT checkpoint (no LoRA wrapper), same
SamplingParams, for the rollout's tokens/s against the engine's plain sampling. Run alone:
    .venv/bin/python bench/bench_ppo.py --policy models/rft --rm models/rlhf/rm --steps 2
(`models/base` works for both when nothing is built: the reward head is then untrained.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from dataclasses import replace

    from closedloop.config import load_params
    from closedloop.engine import EngineBackend
    from closedloop.feedback.ppo import train_ppo
    from closedloop.feedback.reward_model import load_reward_model, reward_scores
    from closedloop.generate import SamplingParams
    from closedloop.io import read_jsonl
    from closedloop.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=str(ROOT / "models/rft"))
    ap.add_argument("--rm", default=str(ROOT / "models/rlhf/rm"))
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    p = replace(load_params(ROOT / "params.yaml").rlhf.policy.ppo, max_steps=args.steps)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in read_jsonl(ROOT / "data/suite/train.jsonl")][:48]
    tok, rm = load_reward_model(Path(args.rm))

    def reward(ps: list, rs: list[str]) -> list[float]:
        return reward_scores(rm, tok, [q[-1]["content"] for q in ps], rs)

    with tempfile.TemporaryDirectory() as out:
        result = train_ppo(Path(args.policy), Path(args.rm), prompts, reward, Path(out) / "policy", p, seed=0)
    print(f"{'step':>4} {'rollout s':>10} {'scoring s':>10} {'update s':>9} {'tokens':>7} {'rollout tok/s':>14}")
    for h in result["history"]:
        print(f"{h['step']:>4} {h['rollout_seconds']:>10.1f} {h['scoring_seconds']:>10.1f} {h['update_seconds']:>9.1f} "
              f"{h['rollout_tokens']:>7.0f} {h['rollout_tokens'] / h['rollout_seconds']:>14.1f}")
    model, mtok = load_model(Path(args.policy))
    engine = EngineBackend(model, mtok, batch_size=p.rollout_batch_size, show_progress=False)
    sampling = SamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens, seed=1)
    start = time.perf_counter()
    outs = engine.sample_ids(prompts[: p.rollout_batch_size], sampling)
    plain_s = time.perf_counter() - start
    plain_tokens = sum(len(o[0][1]) for o in outs)
    rollout = sum(h["rollout_tokens"] for h in result["history"]) / sum(h["rollout_seconds"] for h in result["history"])
    print(f"plain engine sampling (no LoRA wrapper): {plain_tokens} tokens in {plain_s:.1f} s "
          f"({plain_tokens / plain_s:.1f} tok/s); PPO rollouts {rollout:.1f} tok/s")
    print(json.dumps({"steps": [{k: round(h[k], 2) for k in ("rollout_seconds", "scoring_seconds", "update_seconds",
                                                            "rollout_tokens")} for h in result["history"]],
                      "rollout_tok_per_s": round(rollout, 1), "plain_tok_per_s": round(plain_tokens / plain_s, 1)}))


if __name__ == "__main__":
    main()
