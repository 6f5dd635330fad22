"""Offline and quiet by default: every entry point calls `set_offline_defaults()` first."""

import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# Set to 0 by the user, HF_HUB_OFFLINE is the one switch: models and datasets go online together.
FOLLOW_HUB = ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def set_offline_defaults() -> None:
    """Set the offline / no-telemetry variables unless the user already chose a value; with
    HF_HUB_OFFLINE=0 the other offline switches default to online too (`datasets` reads its own)."""
    online = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no", "off")
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, "0" if online and key in FOLLOW_HUB else value)
