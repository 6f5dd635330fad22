"""SFT step time: TRL 1.16's fused LM head against feedback/sft.py's direct completion loss on CPU.

Trains `--steps` steps of params.yaml's `rft.sft` section (demo size: LoRA, batch 8) from
models/base on RFT's kept samples (data/rft/sft.jsonl), once with TRL's SFTTrainer as shipped and
once with the project's trainer class, same seed and batches, and prints seconds per step and the
losses of each (they should agree to float rounding). Needs `dvc repro rft_verify`. Run alone:
    .venv/bin/python bench/bench_sft.py --steps 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(trainer_cls, examples: list[dict], sft, steps: int, seed: int) -> dict:
    from closedloop.feedback.sft import sft_trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = sft_trainer(ROOT / "models/base", examples, Path(tmp), sft, seed=seed, trainer_cls=trainer_cls,
                              max_steps=steps)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"s_per_step": seconds / steps, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def main() -> None:
    import torch
    from trl import SFTTrainer

    from closedloop.config import load_params
    from closedloop.feedback.sft import sft_trainer_class
    from closedloop.io import read_jsonl
    from closedloop.methods.rft import sft_examples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    examples = sft_examples(read_jsonl(ROOT / "data/rft/sft.jsonl"))
    sft = params.rft.sft
    print(f"{len(examples)} examples, batch {sft.batch_size}, {a.steps} steps, {torch.get_num_threads()} threads")
    rows = {"trl_fused_head": run(SFTTrainer, examples, sft, a.steps, params.seed),
            "direct_completion_loss": run(sft_trainer_class(), examples, sft, a.steps, params.seed)}
    for name, r in rows.items():
        print(f"{name:24s} {r['s_per_step']:6.2f} s/step  losses {' '.join(f'{x:.4f}' for x in r['losses'])}")
    speedup = rows["trl_fused_head"]["s_per_step"] / rows["direct_completion_loss"]["s_per_step"]
    print(f"speedup {speedup:.2f}x")
    print(json.dumps({**rows, "speedup": speedup}))


if __name__ == "__main__":
    main()
