"""Named model presets: the config JSON files in configuration/models/ (the paper's settings, tiny, 370M)."""

import json
from pathlib import Path

from .configuration_fwp import FWPConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "configuration" / "models"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str, **overrides) -> FWPConfig:
    """FWPConfig from a preset name (e.g. "tiny", "wt103-small-delta-net") or a path to a config JSON; keyword
    overrides replace fields (and are validated like any config value)."""
    path = Path(name_or_path)
    if not path.suffix == ".json" or not path.exists():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise ValueError(f"Unknown preset {name_or_path!r}; available presets: {', '.join(list_presets())} "
                         f"(or pass the path of a config JSON).")
    fields = json.loads(path.read_text())
    fields.pop("_comment", None)
    fields.pop("model_type", None)
    fields.update(overrides)
    return FWPConfig(**fields)
