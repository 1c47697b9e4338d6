"""The model code must load from a flat Hub folder with trust_remote_code, on machines without triton or fla."""

import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import modeling_fwp

PACKAGE = Path(modeling_fwp.__file__).parent


def hub_files():
    return [Path(f) for f in get_relative_import_files(PACKAGE / "modeling_fwp.py")] + [PACKAGE / "modeling_fwp.py"]


def test_every_copied_module_needs_only_torch_and_transformers():
    # transformers checks each downloaded module's unguarded imports; triton / fla must sit inside try/except.
    for path in hub_files():
        third_party = {name for name in get_imports(path) if name not in sys.stdlib_module_names}
        assert third_party <= {"torch", "transformers"}, (path.name, third_party)


def test_copied_modules_are_flat_siblings_that_exist():
    names = {p.name for p in hub_files()}
    assert {"configuration_fwp.py", "ops.py", "ops_chunk.py", "feature_maps.py", "cache_fwp.py"} <= names
    for path in hub_files():
        assert path.parent == PACKAGE and path.exists(), path
    # training / publishing helpers are not model code and must not travel to the Hub
    assert not names & {"data.py", "tokenizer_utils.py", "hub_card.py", "presets.py"}
