"""Bad input, table-driven, through the commands a user runs: params.yaml (`closedloop params`),
dvc.yaml edits (`closedloop stage`, the flow), model paths (`closedloop stage base`/`eval@...`),
`closedloop verify` inputs and held-out prompt files. Each must exit 2 with one line naming the
file and the key or line, and leave the project as it was (a failed stage's MLflow run is kept,
marked FAILED: that is the record of the attempt, not an output)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import TINY_PARAMS, copy_project, project_env, set_params

TRACKING = {"mlflow.db", ".mlflow.lock", "mlartifacts"}  # the store records failed attempts


@dataclass
class Case:
    id: str
    command: list[str]
    expect: list[str]  # substrings of the one error line: the file, then the key or line
    params: dict | None = None  # merged into params.yaml (paths: {tmp} is the case's scratch dir)
    files: dict[str, bytes | str] = field(default_factory=dict)  # scratch files: name -> content
    edit: Callable[[Path, Path], None] | None = None  # (root, scratch) -> None, for anything else


def raw_params(text: str) -> Callable[[Path, Path], None]:
    return lambda root, tmp: (root / "params.yaml").write_text(text)


def edit_dvc_yaml(fn: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def edit(root: Path, tmp: Path) -> None:
        data = yaml.safe_load((root / "dvc.yaml").read_text())
        fn(data)
        (root / "dvc.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return edit


def model_dir(kind: str) -> Callable[[Path, Path], None]:
    """A model directory in the scratch dir that is not a usable causal LM checkpoint."""
    def make(root: Path, tmp: Path) -> None:
        d = tmp / "model"
        d.mkdir()
        if kind == "empty":
            return
        if kind == "bert":
            (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 0}))
            (d / "model.safetensors").write_bytes(b"")
            return
        shutil.copy(root / "models/base/config.json", d / "config.json")
        if kind == "bin":
            (d / "pytorch_model.bin").write_bytes(b"\0" * 16)
    return make


IFEVAL_ROW = {"key": 1, "prompt": "Write in lowercase.", "instruction_id_list": ["change_case:english_lowercase"],
              "kwargs": [{}], "response": "hello"}
ROW = json.dumps(IFEVAL_ROW)
PROMPT_ROW = json.dumps({k: v for k, v in IFEVAL_ROW.items() if k != "response"})
VERIFY = ["closedloop", "verify", "{tmp}/in.jsonl", "-o", "{tmp}/out.jsonl"]
PARAMS = ["closedloop", "params"]
EVAL = ["closedloop", "stage", "eval@base"]
SOLVE = ["closedloop", "stage", "dct_solve"]


def scored_graph(nodes: int, edges: list, fixed: dict | None = None) -> Callable[[Path, Path], None]:
    """data/dct/scored.jsonl with one graph, as dct_score writes it."""
    def write(root: Path, tmp: Path) -> None:
        fixed_ = fixed or {}
        graph = {"graph": "g0000", "source": "test", "edges": edges,
                 "nodes": [{"id": i, "text": f"claim {i}", "role": "seed" if i == 0 else "implied", "p_true": 0.7,
                            "fixed": i in fixed_, "label": fixed_.get(i)} for i in range(nodes)]}
        (root / "data/dct").mkdir(parents=True, exist_ok=True)
        (root / "data/dct/scored.jsonl").write_text(json.dumps(graph) + "\n")
    return write


CASES = [
    # params.yaml
    Case("params-empty", PARAMS, ["params.yaml", "empty"], edit=raw_params("")),
    Case("params-comment-only", PARAMS, ["params.yaml", "empty"], edit=raw_params("# nothing\n")),
    Case("params-not-a-mapping", PARAMS, ["params.yaml", "top level"], edit=raw_params("- a\n- b\n")),
    Case("params-invalid-yaml", PARAMS, ["params.yaml:3", "invalid YAML"], edit=raw_params("seed: 0\nrft: [1, 2\n")),
    Case("params-duplicate-key", PARAMS, ["params.yaml:2", "duplicate key 'seed'"], edit=raw_params("seed: 0\nseed: 1\n")),
    Case("params-non-utf8", PARAMS, ["params.yaml", "UTF-8"],
         edit=lambda root, tmp: (root / "params.yaml").write_bytes(b"seed: 0\n# caf\xe9\n")),
    Case("params-missing-file", PARAMS, ["params.yaml", "not found"],
         edit=lambda root, tmp: (root / "params.yaml").unlink()),
    Case("params-unknown-section", PARAMS, ["params.yaml", "colour"], params={"colour": "blue"}),
    Case("params-unknown-key", PARAMS, ["params.yaml", "rft.numsamples"], params={"rft": {"numsamples": 3}}),
    Case("params-wrong-type", PARAMS, ["params.yaml", "rft.num_samples"], params={"rft": {"num_samples": "four"}}),
    Case("params-float-count", PARAMS, ["params.yaml", "prepare.num_train"], params={"prepare": {"num_train": 1e9}}),
    Case("params-huge-count", PARAMS, ["params.yaml", "rft.num_samples"], params={"rft": {"num_samples": 10**9}}),
    Case("params-negative", PARAMS, ["params.yaml", "prepare.num_eval"], params={"prepare": {"num_eval": -1}}),
    Case("params-inf-temperature", PARAMS, ["params.yaml", "rft.temperature"], edit=raw_params(
        "seed: 0\nrft: {temperature: .inf}\n")),
    Case("params-nan-lr", PARAMS, ["params.yaml", "rft.sft.learning_rate"], params={"rft": {"sft": {"learning_rate": float("nan")}}}),
    Case("params-inf-epochs", PARAMS, ["params.yaml", "spar.dpo.epochs"], params={"spar": {"dpo": {"epochs": float("inf")}}}),
    Case("params-top-p-zero", PARAMS, ["params.yaml", "rft.top_p"], params={"rft": {"top_p": 0}}),
    Case("params-yaml11-bool", PARAMS, ["params.yaml", "model.trust_remote_code"], params={"model": {"trust_remote_code": "yes"}}),
    Case("params-bad-dtype", PARAMS, ["params.yaml", "model.dtype"], params={"model": {"dtype": "float64"}}),
    Case("params-bad-reference", PARAMS, ["params.yaml", "evaluate.reference"], params={"evaluate": {"reference": "gpt"}}),
    Case("params-unknown-suite", PARAMS, ["params.yaml", "evaluate.suites"], params={"evaluate": {"suites": ["trivia"]}}),
    Case("params-unknown-verifier", PARAMS, ["params.yaml", "rft.verifier"], params={"rft": {"verifier": "oracle"}}),
    Case("params-bad-scoring", PARAMS, ["params.yaml", "spar.judge.scoring"], params={"spar": {"judge": {"scoring": "dice"}}}),
    Case("params-bad-strategy", PARAMS, ["params.yaml", "spar.tree.strategy"], params={"spar": {"tree": {"strategy": "astar"}}}),
    Case("params-lora-rank-zero", PARAMS, ["params.yaml", "rft.sft.lora.r"], params={"rft": {"sft": {"lora": {"r": 0}}}}),
    Case("params-min-over-max", PARAMS, ["params.yaml", "prepare.min_constraints"],
         params={"prepare": {"min_constraints": 3, "max_constraints": 2}}),
    Case("params-seed-text", PARAMS, ["params.yaml", "seed"], params={"seed": "abc"}),
    Case("params-dct-bad-mode", PARAMS, ["params.yaml", "dct.seeds.mode"], params={"dct": {"seeds": {"mode": "magic"}}}),
    Case("params-dct-nothing-to-expand", PARAMS, ["params.yaml", "dct.expand.num_implied"],
         params={"dct": {"expand": {"num_implied": 0, "num_contradicted": 0}}}),
    Case("params-dct-bad-oversize", PARAMS, ["params.yaml", "dct.consistency.oversize"],
         params={"dct": {"consistency": {"oversize": "truncate"}}}),
    Case("params-facts-hub-without-dataset", PARAMS, ["params.yaml", "facts.hub.dataset"], params={"facts": {"source": "hub"}}),
    # a path param naming something that is not a file or a directory: reading it would block forever
    Case("params-path-is-a-fifo", PARAMS, ["params.yaml", "evaluate.prompts", "a FIFO"],
         params={"evaluate": {"prompts": "{tmp}/fifo"}}, edit=lambda root, tmp: os.mkfifo(tmp / "fifo")),
    # the flow refuses it before `dvc status`, which would hang reading the FIFO (DVC hashes its deps)
    Case("params-path-is-a-fifo-flow", [sys.executable, "flows/pipeline.py", "--target", "eval@base"],
         ["params.yaml", "evaluate.prompts", "a FIFO"],
         params={"evaluate": {"prompts": "{tmp}/fifo"}}, edit=lambda root, tmp: os.mkfifo(tmp / "fifo")),
    Case("params-path-is-a-device", PARAMS, ["params.yaml", "evaluate.claims", "/dev/zero", "a device"],
         params={"evaluate": {"claims": "/dev/zero"}}),
    Case("params-rft-verifier-args", PARAMS, ["params.yaml", "rft.verifier_args", "'lenient'"],
         params={"rft": {"verifier_args": {"mode": "lenient"}}}),
    Case("params-rft-verifier-unknown-arg", PARAMS, ["params.yaml", "rft.verifier_args.mood", "mode, threshold"],
         params={"rft": {"verifier_args": {"mood": "strict"}}}),
    Case("params-empty-experiment", PARAMS, ["params.yaml", "tracking.experiment", "non-empty"],
         params={"tracking": {"experiment": " "}}),
    Case("params-unknown-tracking-scheme", PARAMS, ["params.yaml", "tracking.tracking_uri", "bogus://x"],
         params={"tracking": {"tracking_uri": "bogus://x"}}),
    Case("params-devices-not-one-per-parallel-stage", PARAMS, ["params.yaml", "launch.devices", "parallel_stages = 2"],
         params={"launch": {"parallel_stages": 2, "devices": ["0"]}}),
    Case("params-bad-claim-format", PARAMS, ["params.yaml", "evaluate.claim_format"],
         params={"evaluate": {"claim_format": "essay"}}),
    # dvc.yaml edits
    Case("dvc-yaml-corrupt-flow", [sys.executable, "flows/pipeline.py"], ["dvc.yaml"],
         edit=lambda root, tmp: (root / "dvc.yaml").write_text("stages:\n  base:\n    cmd: [unclosed\n")),
    Case("dvc-yaml-unknown-target", [sys.executable, "flows/pipeline.py", "--target", "nosuch"], ["dvc.yaml", "'nosuch'"]),
    Case("dvc-yaml-unknown-stage-command", ["closedloop", "stage", "nosuch"], ["nosuch"],
         edit=edit_dvc_yaml(lambda d: d["stages"].__setitem__("nosuch", {"cmd": "closedloop stage nosuch"}))),
    # a foreach group's name instead of one of its stages: the stages that exist are named
    Case("stage-group-without-key", ["closedloop", "stage", "eval"], ["dvc.yaml", "'eval'", "eval@base"]),
    Case("stage-group-of-one-without-key", ["closedloop", "stage", "spar_sample"], ["dvc.yaml", "spar_sample@it1"]),
    Case("dvc-yaml-corrupt-stage", ["closedloop", "stage", "prepare"], ["dvc.yaml:3", "did not find"],
         edit=lambda root, tmp: (root / "dvc.yaml").write_text("stages:\n  prepare: {cmd: [\n")),
    Case("dvc-yaml-stage-removed", ["closedloop", "stage", "prepare"], ["dvc.yaml", "prepare"],
         edit=edit_dvc_yaml(lambda d: d["stages"].pop("prepare"))),
    # model paths
    Case("model-missing", ["closedloop", "stage", "base"], ["model.base", "does not exist"],
         params={"model": {"base": "{tmp}/nowhere"}}),
    Case("model-empty-dir", ["closedloop", "stage", "base"], ["model.base", "config.json"],
         params={"model": {"base": "{tmp}/model"}}, edit=model_dir("empty")),
    Case("model-no-weights", ["closedloop", "stage", "base"], ["model.base", "safetensors"],
         params={"model": {"base": "{tmp}/model"}}, edit=model_dir("config")),
    Case("model-only-pickle", ["closedloop", "stage", "base"], ["model.base", "safetensors"],
         params={"model": {"base": "{tmp}/model"}}, edit=model_dir("bin")),
    Case("model-bert-no-architectures", ["closedloop", "stage", "base"], ["model.base", "not a causal language model"],
         params={"model": {"base": "{tmp}/model"}}, edit=model_dir("bert")),
    Case("model-pointer-invalid-json", ["closedloop", "stage", "base"], ["model.base", "pointer.json", "invalid JSON"],
         params={"model": {"base": "{tmp}/pointer.json"}}, files={"pointer.json": "{nope"}),
    Case("model-pointer-no-kind", ["closedloop", "stage", "base"], ["model.base", "pointer.json", "hub_id"],
         params={"model": {"base": "{tmp}/pointer.json"}}, files={"pointer.json": '{"name": "x"}'}),
    Case("eval-model-not-built", EVAL, ["evaluate.models.base", "{tmp}/model", "no model checkpoint"],
         params={"evaluate": {"models": {"base": "{tmp}/model"}}}, edit=model_dir("empty")),
    # closedloop verify
    Case("verify-missing", VERIFY, ["in.jsonl", "not found"]),
    Case("verify-invalid-json", VERIFY, ["in.jsonl:2", "invalid JSON"], files={"in.jsonl": ROW + "\n{oops\n"}),
    Case("verify-array-row", VERIFY, ["in.jsonl:1", "JSON object"], files={"in.jsonl": "[1, 2]\n"}),
    Case("verify-duplicate-key", VERIFY, ["in.jsonl:2", "duplicate key 'response'"],
         files={"in.jsonl": ROW + "\n" + ROW[:-1] + ', "response": "again"}\n'}),
    Case("verify-nan", VERIFY, ["in.jsonl:2", "got NaN"], files={"in.jsonl": ROW + "\n" + ROW[:-1] + ', "score": NaN}\n'}),
    Case("verify-binary", VERIFY, ["in.jsonl:1", "UTF-8"], files={"in.jsonl": b"\x89PNG\r\n\x1a\n\x00\xff"}),
    Case("verify-utf16", VERIFY, ["in.jsonl:1", "UTF-8"], files={"in.jsonl": (ROW + "\n").encode("utf-16")}),
    Case("verify-empty", VERIFY, ["in.jsonl", "no rows"], files={"in.jsonl": ""}),
    Case("verify-no-response", VERIFY, ["in.jsonl:1", "response"],
         files={"in.jsonl": json.dumps({k: v for k, v in IFEVAL_ROW.items() if k != "response"}) + "\n"}),
    Case("verify-unknown-instruction", VERIFY, ["in.jsonl:1", "nonsense:thing"],
         files={"in.jsonl": json.dumps(IFEVAL_ROW | {"instruction_id_list": ["nonsense:thing"]}) + "\n"}),
    Case("verify-kwargs-mismatch", VERIFY, ["in.jsonl:1", "kwargs"],
         files={"in.jsonl": json.dumps(IFEVAL_ROW | {"kwargs": [{}, {}]}) + "\n"}),
    Case("verify-output-is-dir", ["closedloop", "verify", "{tmp}/in.jsonl", "-o", "{tmp}/outdir", "--force"],
         ["outdir", "directory"], files={"in.jsonl": ROW + "\n"}, edit=lambda root, tmp: (tmp / "outdir").mkdir()),
    Case("verify-input-is-dir", ["closedloop", "verify", "{tmp}", "-o", "{tmp}/out.jsonl"], ["directory"]),
    # held-out prompts (evaluate.prompts)
    Case("prompts-missing", EVAL, ["evaluate.prompts", "prompts.jsonl", "not found"], params={"evaluate": {"prompts": "{tmp}/prompts.jsonl"}}),
    Case("prompts-duplicate-key", EVAL, ["evaluate.prompts", "prompts.jsonl:2", "key 1 repeats line 1"],
         params={"evaluate": {"prompts": "{tmp}/prompts.jsonl"}}, files={"prompts.jsonl": PROMPT_ROW + "\n" + PROMPT_ROW + "\n"}),
    Case("prompts-infinity", EVAL, ["evaluate.prompts", "prompts.jsonl:1", "got Infinity"],
         params={"evaluate": {"prompts": "{tmp}/prompts.jsonl"}}, files={"prompts.jsonl": PROMPT_ROW[:-1] + ', "w": Infinity}\n'}),
    Case("prompts-invalid-line", EVAL, ["evaluate.prompts", "prompts.jsonl:2", "invalid JSON"],
         params={"evaluate": {"prompts": "{tmp}/prompts.jsonl"}}, files={"prompts.jsonl": PROMPT_ROW + "\nnot json\n"}),
    Case("prompts-no-instructions", EVAL, ["prompts.jsonl:1", "instruction_id_list"],
         params={"evaluate": {"prompts": "{tmp}/prompts.jsonl"}}, files={"prompts.jsonl": '{"key": 1, "prompt": "hi"}\n'}),
    Case("prompts-non-utf8", EVAL, ["prompts.jsonl:1", "UTF-8"],
         params={"evaluate": {"prompts": "{tmp}/prompts.jsonl"}}, files={"prompts.jsonl": b"{\"prompt\": \"caf\xe9\"}\n"}),
    # longer than the tiny model's 4096 positions: refused before any generation, not run past them
    Case("prompts-longer-than-the-context", EVAL, ["generation", "context of 4096 tokens", "has 5"],
         params={"evaluate": {"prompts": "{tmp}/prompts.jsonl"}},
         files={"prompts.jsonl": json.dumps(json.loads(PROMPT_ROW) | {"prompt": "the " * 5000}) + "\n"}),
    Case("prompts-empty", EVAL, ["evaluate.prompts", "prompts.jsonl", "no rows"],
         params={"evaluate": {"prompts": "{tmp}/prompts.jsonl"}}, files={"prompts.jsonl": "\n"}),
    # held-out claims (evaluate.claims) and DCT's inputs
    Case("claims-missing", EVAL, ["evaluate.claims", "claims.jsonl", "not found"],
         params={"evaluate": {"claims": "{tmp}/claims.jsonl"}}),
    Case("claims-bad-label", EVAL, ["evaluate.claims", "claims.jsonl:2", "label"],
         params={"evaluate": {"claims": "{tmp}/claims.jsonl"}},
         files={"claims.jsonl": '{"claim": "2 + 2 = 4.", "label": true}\n{"claim": "1 + 1 = 3.", "label": "maybe"}\n'}),
    Case("claims-no-claim", EVAL, ["evaluate.claims", "claims.jsonl:1", "claim"],
         params={"evaluate": {"claims": "{tmp}/claims.jsonl"}}, files={"claims.jsonl": '{"label": true}\n'}),
    Case("dct-topics-bad-line", ["closedloop", "stage", "dct_seed"], ["dct.seeds.topics", "topics.jsonl:2", "topic"],
         params={"dct": {"seeds": {"mode": "unsupervised", "topics": "{tmp}/topics.jsonl"}}},
         files={"topics.jsonl": '{"topic": "numbers"}\n{"name": "months"}\n'}),
    # a file a param names: the reader's own errors (invalid JSON, a key twice) name the param too
    Case("dct-topics-invalid-json", ["closedloop", "stage", "dct_seed"], ["dct.seeds.topics", "topics.jsonl:1", "invalid JSON"],
         params={"dct": {"seeds": {"mode": "unsupervised", "topics": "{tmp}/topics.jsonl"}}},
         files={"topics.jsonl": '{"topic": \n'}),
    Case("spct-pairs-duplicate-key", ["closedloop", "stage", "spct_data"], ["spct.data.pairs", "pairs.jsonl:1", "'chosen'"],
         params={"spct": {"data": {"source": "pairs", "pairs": "{tmp}/pairs.jsonl"}}},
         files={"pairs.jsonl": '{"prompt": "q", "chosen": "a", "chosen": "c", "rejected": "b"}\n'}),
    Case("prepare-seeds-invalid-json", ["closedloop", "stage", "prepare"], ["prepare.seeds", "seeds.jsonl:1", "invalid JSON"],
         params={"prepare": {"seeds": "{tmp}/seeds.jsonl"}}, files={"seeds.jsonl": "{oops\n"}),
    Case("rlhf-policy-prompt-null", ["closedloop", "stage", "rlhf_policy"], ["rlhf.policy.prompts", "p.jsonl:2", "prompt"],
         params={"rlhf": {"policy": {"prompts": "{tmp}/p.jsonl"}}}, files={"p.jsonl": '{"prompt": "q"}\n{"prompt": null}\n'}),
    # a name of an evaluate.models entry: its form with the params, its entry where a stage reads it
    Case("rlhf-sft-name-path", PARAMS, ["rlhf.eval.sft_name", "evaluate.models entry", "'../rft'"],
         params={"rlhf": {"eval": {"sft_name": "../rft"}}}),
    Case("rlhf-sft-name-unknown", ["closedloop", "stage", "rlhf_eval"],
         ["rlhf.eval.sft_name", "expected one of evaluate.models", "'sft'"], params={"rlhf": {"eval": {"sft_name": "sft"}}}),
    Case("proxy-tuned-unknown-flow", [sys.executable, "flows/pipeline.py", "--target", "proxy"],
         ["proxy.tuned", "expected one of evaluate.models", "'tuned'"], params={"proxy": {"tuned": "tuned"}}),
    Case("proxy-prompt-number", ["closedloop", "stage", "proxy_small"], ["proxy.small.prompts", "p.jsonl:1", "prompt"],
         params={"proxy": {"small": {"prompts": "{tmp}/p.jsonl"}}}, files={"p.jsonl": '{"prompt": 3}\n'}),
    Case("dct-documents-empty", ["closedloop", "stage", "dct_seed"], ["dct.seeds.documents", "docs.jsonl", "no lines"],
         params={"dct": {"seeds": {"mode": "update", "documents": "{tmp}/docs.jsonl"}}}, files={"docs.jsonl": ""}),
    Case("dct-graph-over-limit", SOLVE, ["scored.jsonl", "g0000", "dct.consistency.max_nodes"],
         params={"dct": {"consistency": {"max_nodes": 3}}},
         edit=scored_graph(5, [[0, i, "implies"] for i in range(1, 5)])),
    Case("dct-infeasible-fixed-labels", SOLVE, ["scored.jsonl", "g0000", "fixed"],
         edit=scored_graph(2, [[0, 1, "contradicts"]], fixed={0: True, 1: True})),
    Case("params-spct-no-votes", PARAMS, ["params.yaml", "spct.eval.votes"], params={"spct": {"eval": {"votes": []}}}),
    Case("params-spct-unknown-selector", PARAMS, ["params.yaml", "spct.eval.selectors", "oracle"],
         params={"spct": {"eval": {"selectors": ["oracle"]}}}),
    Case("params-spct-grpo-group", PARAMS, ["params.yaml", "spct.grpo.batch_size", "num_generations"],
         params={"spct": {"grpo": {"batch_size": 3, "num_generations": 2}}}),
    Case("spct-pairs-bad-line", ["closedloop", "stage", "spct_data"], ["spct.data.pairs", "pairs.jsonl:2", "rejected"],
         params={"spct": {"data": {"source": "pairs", "pairs": "{tmp}/pairs.jsonl"}}},
         files={"pairs.jsonl": '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2", "chosen": "a"}\n'}),
    Case("spct-samples-no-score", ["closedloop", "stage", "spct_data"], ["spct.data.samples", "s.jsonl:1", "score"],
         params={"spct": {"data": {"source": "rules", "samples": "{tmp}/s.jsonl"}}},
         files={"s.jsonl": '{"key": "a", "prompt": "q", "response": "r"}\n'}),
    Case("params-rlhf-ppo-minibatch", PARAMS, ["params.yaml", "rlhf.policy.ppo.batch_size", "mini-batch"],
         params={"rlhf": {"policy": {"ppo": {"rollout_batch_size": 8, "batch_size": 3}}}}),
    Case("params-rlhf-algorithm", PARAMS, ["params.yaml", "rlhf.policy.algorithm", "'ppo'"],
         params={"rlhf": {"policy": {"algorithm": "dpo"}}}),
    Case("params-rlhf-kl-estimator", PARAMS, ["params.yaml", "rlhf.policy.ppo.kl_estimator", "'k3'"],
         params={"rlhf": {"policy": {"ppo": {"kl_estimator": "k2"}}}}),
    Case("rlhf-pairs-bad-line", ["closedloop", "stage", "rlhf_prefs"], ["rlhf.prefs.pairs", "pairs.jsonl:2", "rejected"],
         params={"rlhf": {"prefs": {"source": "pairs", "pairs": "{tmp}/pairs.jsonl"}}},
         files={"pairs.jsonl": '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2", "chosen": "a"}\n'}),
    Case("rlhf-samples-no-score", ["closedloop", "stage", "rlhf_prefs"], ["rlhf.prefs.samples", "s.jsonl:1", "score"],
         params={"rlhf": {"prefs": {"source": "rules", "samples": "{tmp}/s.jsonl"}}},
         files={"s.jsonl": '{"key": "a", "prompt": "q", "response": "r"}\n'}),
    Case("params-proxy-template", PARAMS, ["params.yaml", "proxy.templates", "chat or raw"],
         params={"proxy": {"templates": {"base": "fancy"}}}),
    Case("params-proxy-no-alphas", PARAMS, ["params.yaml", "proxy.alphas", "non-empty"], params={"proxy": {"alphas": []}}),
    Case("proxy-vocabulary-mismatch", ["closedloop", "stage", "proxy_eval"],
         ["proxy anti_expert", "tokenizer differs", "shared vocabulary"],
         params={"proxy": {"base": "models/base", "expert": "models/base", "anti_expert": "{tmp}/other"}},
         edit=lambda root, tmp: other_vocabulary_model(tmp / "other")),
]


def other_vocabulary_model(path: Path) -> None:
    """A tiny checkpoint whose tokenizer is not the project's (the project's splits digits: this one has none)."""
    from tiny_model import make_tiny_model_and_tokenizer

    model, tok = make_tiny_model_and_tokenizer(split_digits=False)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in {".git", *TRACKING} or rel.parts[:2] == (".dvc", "tmp"):
            continue
        st = p.lstat()
        # a directory counts by its existence (a temporary entry made and removed inside it is no output)
        out[str(rel)] = ("dir",) if p.is_dir() else (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def substitute(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: substitute(v, tmp) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    root = copy_project(tmp_path_factory.mktemp("bad") / "project")
    set_params(root, dict(TINY_PARAMS, model={"base": str(tiny_model_dir)}))
    env = project_env(root, tmp_path_factory.mktemp("prefect_unused"))
    for stage in ("base", "prepare", "facts"):  # real outputs, so later stages fail on the bad input itself
        proc = subprocess.run(["closedloop", "stage", stage], cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root, env


def test_the_corpus_is_large_and_each_case_is_named_once():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(project, tmp_path, case):
    root, env = project
    saved = {name: (root / name).read_bytes() for name in ("params.yaml", "dvc.yaml")}
    try:
        for name, content in case.files.items():
            (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
        if case.params:
            set_params(root, substitute(case.params, tmp_path))
        if case.edit:
            case.edit(root, tmp_path)
        before, scratch_before = snapshot(root), snapshot(tmp_path)
        command = [substitute(a, tmp_path) for a in case.command]
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        after, scratch_after = snapshot(root), snapshot(tmp_path)
    finally:
        for name, content in saved.items():
            (root / name).write_bytes(content)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for part in case.expect:
        assert substitute(part, tmp_path) in lines[0], lines[0]
    assert after == before, set(after) ^ set(before) or "a file changed"
    assert scratch_after == scratch_before, set(scratch_after) ^ set(scratch_before)
    if (root / "mlflow.db").exists():  # a failed stage's run is marked FAILED, never left RUNNING
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        running = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'")
        assert len(running) == 0


def test_a_file_size_limit_gives_one_line_exit_2_and_no_partial_output(project, tmp_path):
    """`ulimit -f`: the write fails with EFBIG (Python ignores SIGXFSZ), in the middle of the output."""
    import resource

    root, env = project
    (tmp_path / "in.jsonl").write_text("".join(ROW + "\n" for _ in range(200)))
    command = [substitute(a, tmp_path) for a in VERIFY]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == f"error: {tmp_path / 'out.jsonl'}: the file would pass this process's file-size limit (ulimit -f)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no partial output, no temporary


def test_a_stage_waits_for_the_mlflow_store_another_process_holds_locked(project):
    """An exclusive lock on mlflow.db for 12 s (opening the store gave up after sqlite3's 5 s): the
    stage waits for it, bounded (20 s: closedloop.tracking.SQLITE_BUSY_SECONDS), and then runs."""
    root, env = project
    hold = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(12); c.execute('COMMIT')")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(root / "mlflow.db")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run(["closedloop", "stage", "prepare"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        released = holder.poll() is not None  # the stage ended after the lock was given up
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert released


def test_a_stage_whose_parent_run_is_not_in_the_store_stops_before_running(project):
    """$CLOSEDLOOP_PARENT_RUN_ID naming a run the store lacks (a store replaced under a flow)."""
    root, env = project
    before = snapshot(root)
    proc = subprocess.run(["closedloop", "stage", "prepare"], cwd=root, capture_output=True, text=True, timeout=300,
                          env=env | {"CLOSEDLOOP_PARENT_RUN_ID": "0123456789abcdef0123456789abcdef"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "has no run 0123456789abcdef0123456789abcdef" in lines[0] and "mlflow.db" in lines[0]
    assert snapshot(root) == before


def test_an_output_directory_symlinked_outside_the_project_is_refused(project, tmp_path):
    """data/eval -> a directory elsewhere: the stage would write there and DVC later delete there."""
    root, env = project
    link, outside = root / "data/eval", tmp_path / "elsewhere"
    outside.mkdir()
    assert not link.exists()  # the fixture never evaluated
    link.symlink_to(outside)
    try:
        before = snapshot(root)
        proc = subprocess.run(EVAL, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        after = snapshot(root)
    finally:
        link.unlink()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: data/eval/base/") and f"resolves to {outside}" in lines[0]
    assert after == before and list(outside.iterdir()) == []


MOUNTS = {  # how to make a directory the process cannot write into, and what the error then says
    "immutable": (["chattr", "+i"], ["chattr", "-i"], "operation not permitted"),
    "read-only-mount": (["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"], ["umount"], "the file system is read-only"),
    "full-disk": (["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs"], ["umount"], "no space left on the device"),
}


@pytest.mark.parametrize("how", list(MOUNTS))
def test_an_output_directory_that_cannot_be_written_gives_one_line_exit_2(project, tmp_path, how):
    """A directory the process may not write: immutable (`chattr +i`), on a file system mounted
    read-only, or on a full one (16 KiB, the output ~100 KiB). Made as root (tests run as root here,
    which file modes do not stop); skipped where the machine does not let this process make one."""
    root, env = project
    (tmp_path / "in.jsonl").write_text("".join(ROW + "\n" for _ in range(200)))
    out = tmp_path / "locked"
    out.mkdir()
    make, undo, expect = MOUNTS[how]
    made = subprocess.run([*make, str(out)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make such a directory here: {made.stderr.decode().strip()}")
    try:
        proc = subprocess.run(["closedloop", "verify", str(tmp_path / "in.jsonl"), "-o", str(out / "out.jsonl")],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300)
        left = sorted(p.name for p in out.iterdir())
    finally:
        subprocess.run([*undo, str(out)], check=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {out}") and expect in lines[0], lines[0]
    assert left == []  # no partial output, no temporary
