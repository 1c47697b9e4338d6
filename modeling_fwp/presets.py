"""Named model presets: the config JSON files in configuration/models/ (the paper's settings, tiny, 370M), and the
"k=v,k=v" config overrides the scripts accept."""

import json
from pathlib import Path

from .configuration_fwp import FWPConfig, config_field_names



def configuration_dir() -> Path:
    """configuration/ (model presets, training recipes, Accelerate configs): inside the package when installed from a
    wheel (pyproject.toml ships it as modeling_fwp/configuration), beside the package in a repository checkout."""
    package = Path(__file__).resolve().parent
    installed = package / "configuration"
    return installed if installed.is_dir() else package.parent / "configuration"


PRESET_DIR = configuration_dir() / "models"
# Bookkeeping keys of saved configs and presets that are not FWPConfig fields.
NON_FIELDS = ("model_type", "transformers_version", "architectures", "auto_map")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_fields(name_or_path: str) -> dict:
    """The config fields of a preset name (e.g. "tiny") or of a config JSON path, without bookkeeping keys."""
    path = Path(name_or_path)
    if name_or_path.endswith(".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"preset {name_or_path!r}: no such file.")
    else:
        path = PRESET_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ValueError(f"Unknown preset {name_or_path!r}; known presets: {', '.join(list_presets()) or 'none'} "
                             f"(configuration/models), or pass the path of a config JSON.")
    return without_bookkeeping(json.loads(path.read_text()))


def without_bookkeeping(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if not k.startswith("_") and k not in NON_FIELDS}


def load_preset(name_or_path: str, **overrides) -> FWPConfig:
    """FWPConfig from a preset name or a config JSON path; keyword overrides replace fields (and are validated like
    any config value; an override that is no FWPConfig field is an error, as a typo would change nothing)."""
    check_field_names(overrides, "load_preset")
    return FWPConfig(**{**preset_fields(name_or_path), **overrides})


def parse_config_overrides(text: str | None) -> dict:
    """ "k=v,k=v" -> {k: v}, values read as JSON where possible (numbers, true/false, null), as strings otherwise;
    unknown field names are refused."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f'--config_overrides: {item!r} is not of the form key=value (e.g. "hidden_size=64").')
        raw = raw.strip()
        raw = {"True": "true", "False": "false", "None": "null"}.get(raw, raw)
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    check_field_names(overrides, "--config_overrides")
    return overrides


def check_field_names(fields, where: str):
    """Refuses names that are no FWPConfig field: there, a typo would otherwise change nothing."""
    allowed = config_field_names()
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown FWPConfig field(s) {unknown}; allowed: {', '.join(allowed)}.")
