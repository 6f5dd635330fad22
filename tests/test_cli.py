"""The command line's own help and reports: `closedloop stage --help`, `closedloop report`."""

from __future__ import annotations

import subprocess
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def closedloop(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["closedloop", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_stage_help_lists_the_stages_of_dvc_yaml_by_method():
    out = closedloop("stage", "--help", cwd=PROJECT).stdout
    listed = dict(line.strip().split(": ", 1) for line in out.split("by method:\n")[1].splitlines() if ": " in line)
    assert listed["shared"] == "base, prepare, facts, eval@<key>, compare"
    assert "spar_refine@<key>" in listed["spar"] and listed["rlhf"].startswith("rlhf_prefs, rlhf_rm")


def test_report_prints_the_last_comparison_or_says_which_stage_writes_it(tmp_path):
    missing = closedloop("report", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: data/compare/report.md: not found; the compare stage writes it (`dvc repro compare`, or the flow)")
    (tmp_path / "data/compare").mkdir(parents=True)
    (tmp_path / "data/compare/report.md").write_text("| model | strict |\n| base | 27.1 |\n")
    shown = closedloop("report", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout == "| model | strict |\n| base | 27.1 |\n"


def test_hf_hub_offline_0_is_the_one_switch_for_models_and_datasets(monkeypatch):
    import os

    from closedloop.env import set_offline_defaults

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    set_offline_defaults()
    assert [os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")] == ["1"] * 3
    for key in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")  # a value the user chose is kept
    set_offline_defaults()
    assert [os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")] == ["0", "0", "1"]


def test_make_leaves_the_switch_to_hf_hub_offline():
    """`HF_HUB_OFFLINE=0 make demo`: make must not pin datasets' own switch offline on the way."""
    import os

    def exported(env: dict[str, str]) -> list[str]:
        show = "show: ; @echo \"$$HF_HUB_OFFLINE,$${HF_DATASETS_OFFLINE-unset}\""
        proc = subprocess.run(["make", "-s", "--eval", show, "show"], cwd=Path(__file__).resolve().parents[1],
                              env=env, capture_output=True, text=True, check=True)
        return proc.stdout.strip().split(",")

    # (not this run's make: its command-line variables reach a child make through MAKEFLAGS)
    base = {k: v for k, v in os.environ.items()
            if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    assert exported(base) == ["1", "unset"]  # offline by default (entry points set the rest)
    assert exported(base | {"HF_HUB_OFFLINE": "0"}) == ["0", "unset"]

