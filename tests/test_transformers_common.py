"""transformers' own model-test harness run against FWP models.

`ModelTesterMixin` (transformers' tests/test_modeling_common.py) and `GenerationTesterMixin` (tests/generation/
test_utils.py) are the tests every in-tree transformers model passes; here they run against two FWP variants:
the paper's defaults (delta rule, ELU+1, sum norm, post-LN) and the modern DeltaNet (pre-norm, identity feature map,
l2 qk-norm, short convolutions, output norm). The tester below is written like transformers' own Mamba2 and
Qwen3-Next testers (tests/models/mamba2/, tests/models/qwen3_next/).

The harness files are not in this repository. They are taken at test time from a cache folder outside it
(scripts/checks/fetch_transformers_tests.py says how it is filled; $FWP_TRANSFORMERS_TESTS overrides the location):
  * test_modeling_common.py and its siblings: the sdist of the INSTALLED transformers release, downloaded from PyPI
    on first use (no PyPI: the whole module skips, saying why);
  * generation/test_utils.py and exporters/test_export.py, which no sdist ships: a public transformers source tree,
    placed once by a developer (absent: the ModelTesterMixin tests still run, with a labelled stand-in for the
    ExportTesterMixin import, and the generation tests are skipped, saying why).
The harness needs `parameterized` (pip install parameterized); without it the module skips.

Skips: the harness skips what does not apply by itself (no attention weights: `has_attentions = False`, as in
Mamba2ModelTest; stateful models: no assisted decoding; slow, accelerator, flash-attention, deepspeed tests). This
module adds none of its own beyond the missing-file case; where a harness gate wrongly takes a test away from FWP
(padding, packing, recurrent-state masking) the test is run with the gate lifted instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import traceback
import types
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers

# ----------------------------------------------------------------------------------------------------------------------
# Pins (scripts/checks/fetch_transformers_tests.py reads these literals)
# ----------------------------------------------------------------------------------------------------------------------
# The releases whose sdist tests/ this module was run and its skip list reviewed against, with the sha256 of the
# sdist on PyPI. Another installed release still runs (its sdist is used unverified).
SDIST_SHA256 = {
    "5.17.0": "a153be279169b55b92d8000bf4af294aed684503d091cca7804da2dd8a9de000",
    "5.24.0": "906cb8c3cb2123575e263962586a4d21a979ce97feeb95fe6aaf66fe6ae88bf3",
}
# tests/generation/ and tests/exporters/ are in no sdist. They come from this commit of transformers' main branch
# (2026-08-19, "Enable mlinter findings artifact for inline PR reviews (#48117)", version 5.16.0.dev0, i.e. between
# the 5.15 and 5.16 releases): the newest public upstream tree that could be reached when this was written. Every
# name both files import from transformers exists in 5.17 and in 5.24.
UPSTREAM_REPOSITORY = "https://github.com/huggingface/transformers"
UPSTREAM_COMMIT = "decba1d2ea4ed3cbf0495d1828abad4b2dba1846"
UPSTREAM_FILES = {  # path in the source tree (and in the cache folder) -> sha256 of the file at UPSTREAM_COMMIT
    "tests/generation/test_utils.py": "9c3b4bce16f6ae1dbf97901e0b9b1eda4db9edf56e5f7fb7308ec2b32a42f966",
    "tests/exporters/test_export.py": "d205f597d055c81dd892a775a727d62a51a6bbd33ff2af36fd2ff02db02e02e2",
}

# ----------------------------------------------------------------------------------------------------------------------
# Loading the harness
# ----------------------------------------------------------------------------------------------------------------------
pytest.importorskip("parameterized", reason="transformers' harness needs `parameterized` (pip install parameterized)")

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "checks" / "fetch_transformers_tests.py"
_spec = importlib.util.spec_from_file_location("_fwp_fetch_transformers_tests", _SCRIPT)
fetch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch)

TRANSFORMERS_VERSION = transformers.__version__
try:
    HARNESS_DIR = fetch.ensure_sdist_tests(TRANSFORMERS_VERSION, SDIST_SHA256.get(TRANSFORMERS_VERSION))
except fetch.Unavailable as error:
    pytest.skip(f"transformers {TRANSFORMERS_VERSION}'s test harness (its sdist's tests/) is not available: {error}",
                allow_module_level=True)

UPSTREAM_MISSING = {path: why for path, why in fetch.upstream_status(HARNESS_DIR, UPSTREAM_FILES).items() if why}
GENERATION_SKIP_REASON = (
    f"tests/generation/test_utils.py of transformers commit {UPSTREAM_COMMIT} (in no sdist) is not in the cache: "
    f"{UPSTREAM_MISSING['tests/generation/test_utils.py']}. Place it with "
    "`python scripts/checks/fetch_transformers_tests.py --git-dir <transformers clone>`." if "tests/generation/test_utils.py" in UPSTREAM_MISSING else None
)


def _stand_in(name: str, **classes) -> None:
    """A module in place of a missing upstream file, holding empty classes ONLY so that test_modeling_common.py's
    `from .exporters.test_export import ExportTesterMixin` / `from .generation.test_utils import
    GenerationTesterMixin` import. It runs no test and stands for none."""
    package_name = name.rsplit(".", 1)[0]
    if package_name not in sys.modules:
        package = types.ModuleType(package_name)
        package.__path__ = []
        sys.modules[package_name] = package
    module = types.ModuleType(name, f"STAND-IN for the missing {name} (see tests/test_transformers_common.py)")
    for class_name in classes:
        setattr(module, class_name, type(class_name, (), {"__doc__": f"STAND-IN: {name} is missing; no tests."}))
    sys.modules[name] = module


def _import_harness(folder: Path):
    """Imports the cached tests/ as the package `tests` (the name its files use: test_utils.py imports
    `tests.exporters.test_export`). This repository's own tests/ has no __init__.py, so nothing else holds it."""
    other = sys.modules.get("tests")
    if other is not None and Path(getattr(other, "__file__", None) or "/").parent != folder / "tests":
        pytest.skip(f"another package named `tests` ({other!r}) is already imported; transformers' harness needs the "
                    "name", allow_module_level=True)
    sys.path.insert(0, str(folder))
    try:
        with warnings.catch_warnings():
            # transformers registers its marks (flash_attn_test, torch_compile_test, ...) in a conftest.py that the
            # sdist does not ship
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
            importlib.import_module("tests")
            if "tests/exporters/test_export.py" in UPSTREAM_MISSING:
                _stand_in("tests.exporters.test_export", ExportTesterMixin=None, ExportGenerateTesterMixin=None)
            if "tests/generation/test_utils.py" in UPSTREAM_MISSING:
                _stand_in("tests.generation.test_utils", GenerationTesterMixin=None)
            return importlib.import_module("tests.test_modeling_common")
    finally:
        sys.path.remove(str(folder))


common = _import_harness(HARNESS_DIR)
ModelTesterMixin = common.ModelTesterMixin
GenerationTesterMixin = common.GenerationTesterMixin
ids_tensor = common.ids_tensor
torch_device = common.torch_device

from modeling_fwp import FWPCache, FWPConfig, FWPForCausalLM, FWPModel  # noqa: E402
from modeling_fwp.compat import CACHE_NAME, output_cache  # noqa: E402

_FWP_STATIC_CACHE = getattr(importlib.import_module("modeling_fwp.cache_fwp"), "FWPStaticCache", None)


class _CacheKind(type):
    def __instancecheck__(cls, obj):
        return isinstance(obj, cls.transformers_class) or type(obj) in cls.fwp_classes


def _cache_kind(transformers_class, *fwp_classes):
    """A stand-in for `transformers_class` in the harness's isinstance checks that also accepts the FWP cache class of
    the same kind (exactly that class: FWPStaticCache, a subclass of FWPCache, is not the dynamic kind)."""
    return _CacheKind(transformers_class.__name__, (),
                      {"transformers_class": transformers_class, "fwp_classes": tuple(c for c in fwp_classes if c)})


# ----------------------------------------------------------------------------------------------------------------------
# The harness finds an in-tree model's role (base model, causal LM) in transformers' *_MAPPING_NAMES tables, which
# `AutoModel*.register` does not touch: enter FWP there while this module runs, as an in-tree "fwp" would be.
# ----------------------------------------------------------------------------------------------------------------------
_NAME_TABLES = {"MODEL_MAPPING_NAMES": "FWPModel", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "FWPForCausalLM"}


@pytest.fixture(scope="module", autouse=True)
def _fwp_in_auto_name_tables():
    from transformers.models.auto import modeling_auto

    added = []
    for table, class_name in _NAME_TABLES.items():
        names = getattr(modeling_auto, table)
        if "fwp" not in names:
            names["fwp"] = class_name
            added.append(names)
    yield
    for names in added:
        del names["fwp"]


# ----------------------------------------------------------------------------------------------------------------------
# Deprecations. The project's rule (pyproject.toml, tests/conftest.py) is that its code triggers none. Here the callers
# are mostly transformers' harness, which comes from a tree older than 5.24 and still spells `past_key_values`; what
# it triggers is not the project's. So the conftest check is lifted for this module (allow_deprecation) and replaced
# by one that looks at who called: a deprecation whose innermost caller outside transformers/torch is this
# repository's code (modeling_fwp/, this file) fails the test; one called from the harness files is let through.
# The Python FutureWarnings transformers raises for deprecated arguments are attributed the same way (stacklevel 2
# names the caller's module): from the harness (`tests.*`) they are shown, from anywhere else they stay errors.
# ----------------------------------------------------------------------------------------------------------------------
pytestmark = [pytest.mark.allow_deprecation, pytest.mark.filterwarnings("default::FutureWarning:tests[.]")]

_DEPRECATION = re.compile(r"deprecat", re.IGNORECASE)
_REPO = Path(__file__).resolve().parent.parent
# The project's own code; a virtual environment inside the checkout (.venv-oldest, a user's .venv) is not.
_PROJECT_DIRS = tuple(_REPO / name for name in ("modeling_fwp", "scripts", "tests"))
_HARNESS = HARNESS_DIR.resolve()


def _deprecation_caller() -> tuple[str, str]:
    """("harness" | "project" | "transformers", frame) for the code that made transformers log a deprecation."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename == __file__ and frame.name in ("_deprecation_caller", "emit", "<lambda>"):
            continue  # this machinery
        path = Path(frame.filename).resolve()
        if path.is_relative_to(_HARNESS):
            return "harness", f"{frame.filename}:{frame.lineno}"
        if any(path.is_relative_to(folder) for folder in _PROJECT_DIRS):
            return "project", f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "transformers", ""  # transformers (or torch) on its own


class _DeprecationsByCaller(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.project = []

    def emit(self, record):
        message = record.getMessage()
        if _DEPRECATION.search(message):
            who, where = _deprecation_caller()
            if who == "project":
                self.project.append(f"{message} [called from {where}]")


@pytest.fixture(autouse=True)
def _no_deprecation_from_the_project(monkeypatch):
    # `warning_once` would hide a second caller of the same message (the harness's first use hides the model's)
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, *args, **kwargs: self.warning(*args, **kwargs),
                        raising=False)
    handler = _DeprecationsByCaller()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    if handler.project:
        pytest.fail(f"the project's code made transformers log a deprecation: {handler.project[0]}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models on a busy 2-core machine."""
    yield


# ----------------------------------------------------------------------------------------------------------------------
# The model tester
# ----------------------------------------------------------------------------------------------------------------------
class FWPModelTester:
    """Builds tiny FWP configs and inputs for the common tests (cf. Mamba2ModelTester / Qwen3NextModelTester)."""

    def __init__(self, parent, variant: dict, batch_size=13, seq_length=7, is_training=True, use_input_mask=True,
                 use_labels=True, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_heads=4,
                 intermediate_size=37, pad_token_id=0, bos_token_id=1, eos_token_id=2, type_sequence_label_size=2,
                 num_labels=3, num_choices=4):
        self.parent = parent
        self.variant = dict(variant)
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_attention_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.intermediate_size = intermediate_size
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.type_sequence_label_size = type_sequence_label_size
        self.num_labels = num_labels
        self.num_choices = num_choices
        self.declare_layer_types = False

    def get_config(self):
        config = FWPConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_heads=self.num_heads, intermediate_size=self.intermediate_size, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, **self.variant,
        )
        if self.declare_layer_types:  # what an in-tree recurrent model declares; FWP itself never reads it
            config.layer_types = ["linear_attention"] * self.num_hidden_layers
        return config

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = None
        if self.use_input_mask:  # as transformers' CausalLMModelTester: row i keeps its first i + 1 tokens
            input_mask = torch.tril(torch.ones_like(input_ids).to(torch_device))
        token_labels = None
        if self.use_labels:
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = FWPModel(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=input_mask)
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_causal_lm(self, config, input_ids, input_mask, token_labels):
        model = FWPForCausalLM(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertEqual(result.loss.shape, ())

    def create_and_check_caching(self, config, input_ids, input_mask, token_labels):
        """Prefill, then one cached step: the same as one forward over everything (Mamba2's
        `create_and_check_mamba2_caching`)."""
        model = FWPModel(config).to(torch_device).eval()
        with torch.no_grad():
            whole = model(input_ids, attention_mask=input_mask).last_hidden_state
            first = model(input_ids[:, :-1], attention_mask=input_mask[:, :-1], use_cache=True)
            second = model(input_ids[:, -1:], attention_mask=input_mask, use_cache=True,
                           **{CACHE_NAME: output_cache(first)})
        torch.testing.assert_close(torch.cat([first.last_hidden_state, second.last_hidden_state], dim=1), whole,
                                   atol=1e-4, rtol=1e-4)

    def create_and_check_chunked_prefill(self, config, input_ids, *args):
        """The first token of a multi-token cached forward equals the same token fed alone (Qwen3-Next's
        `test_linear_attention_multi_token_cached_forward_matches_single_token`)."""
        model = FWPModel(config).to(torch_device).eval()
        prompt, next_token, distractors = input_ids[:1, :4], input_ids[:1, 4:5], input_ids[:1, 5:]
        with torch.no_grad():
            single_cache = FWPCache(config=config)
            model(input_ids=prompt, use_cache=True, **{CACHE_NAME: single_cache})
            single = model(input_ids=next_token, use_cache=True, **{CACHE_NAME: single_cache}).last_hidden_state
            multi_cache = FWPCache(config=config)
            model(input_ids=prompt, use_cache=True, **{CACHE_NAME: multi_cache})
            multi = model(input_ids=torch.cat([next_token, distractors], dim=1), use_cache=True,
                          **{CACHE_NAME: multi_cache}).last_hidden_state
        torch.testing.assert_close(multi[:, 0], single[:, 0], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The shared test body; one subclass per variant
# ----------------------------------------------------------------------------------------------------------------------
_BASES = (ModelTesterMixin,) if GENERATION_SKIP_REASON else (ModelTesterMixin, GenerationTesterMixin)


class FWPCommonTests(*_BASES):
    all_model_classes = (FWPModel, FWPForCausalLM)
    variant: dict = {}
    # Mamba2ModelTest: "Mamba does not support attentions" (an FWP layer has no attention weights either).
    has_attentions = False
    # The harness dates a model by a "# Copyright <year>" line in its config file (FWP's has none, so "before 2023")
    # and skips this check for old models unless their `_init_weights` is declared fixed: check it.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = FWPModelTester(self, self.variant)

    # --- model-specific tests (as Mamba2ModelTest / Qwen3NextModelTest add them) ---------------------------------
    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_causal_lm(self):
        self.model_tester.create_and_check_causal_lm(*self.model_tester.prepare_config_and_inputs())

    def test_fwp_caching(self):
        self.model_tester.create_and_check_caching(*self.model_tester.prepare_config_and_inputs())

    def test_fwp_multi_token_cached_forward_matches_single_token(self):
        self.model_tester.create_and_check_chunked_prefill(*self.model_tester.prepare_config_and_inputs())

    def test_tied_weight_embeddings(self):
        """As Mamba2ModelTest's regression test: `tie_word_embeddings` ties the LM head to the input embeddings, and
        only then."""
        config = self.model_tester.get_config()
        config.tie_word_embeddings = True
        model = FWPForCausalLM(config)
        self.assertEqual(model.lm_head.weight.data_ptr(), model.model.embed_tokens.weight.data_ptr())
        config.tie_word_embeddings = False
        model = FWPForCausalLM(config)
        self.assertNotEqual(model.lm_head.weight.data_ptr(), model.model.embed_tokens.weight.data_ptr())

    # --- harness tests whose gate does not fit FWP: run them rather than let them skip ---------------------------
    if not GENERATION_SKIP_REASON:
        def test_left_padding_compatibility(self):
            """The harness takes `has_attentions=False` to mean "no padding support" (true of Mamba); FWP unpads, so
            left padding must give the same logits: run the test with the flag on."""
            self.has_attentions = True
            try:
                super().test_left_padding_compatibility()
            finally:
                del self.has_attentions

        def test_recurrent_layers_mask_padding_on_continued_forward(self):
            """The harness recognises recurrent models by `config.layer_types`; FWP layers are all linear-attention
            layers but FWPConfig does not list them, so the tester declares them for this test."""
            self.model_tester.declare_layer_types = True
            super().test_recurrent_layers_mask_padding_on_continued_forward()

        def test_eager_padding_matches_padding_free_with_position_ids(self):
            """The harness assumes stateful / non-attention-backend models cannot pack sequences; FWP can (packed
            position_ids are read as document boundaries), so the padded and the packed batch must give the same
            logits: run it with those gates lifted."""
            self.has_attentions = True
            try:
                with mock.patch.object(FWPForCausalLM, "_is_stateful", False), \
                        mock.patch.object(FWPForCausalLM, "_supports_attention_backend", True):
                    super().test_eager_padding_matches_padding_free_with_position_ids()
            finally:
                del self.has_attentions

        # The harness asserts the *kind* of cache generate() returned by class: transformers' DynamicCache for the
        # default and StaticCache for cache_implementation="static". FWP has its own classes for the two kinds
        # (FWPCache, FWPStaticCache); the tests below run with those names standing for both, so everything else
        # they check (same outputs compiled and eager, no recompilation, cache shapes) still runs.
        def _with_fwp_cache_kinds(self, test):
            harness = sys.modules[GenerationTesterMixin.__module__]
            with mock.patch.multiple(harness, DynamicCache=_cache_kind(harness.DynamicCache, FWPCache),
                                     StaticCache=_cache_kind(harness.StaticCache, _FWP_STATIC_CACHE)):
                test()

        def test_generate_with_static_cache(self):
            self._with_fwp_cache_kinds(super().test_generate_with_static_cache)

        def test_generate_from_inputs_embeds_with_static_cache(self):
            self._with_fwp_cache_kinds(super().test_generate_from_inputs_embeds_with_static_cache)

        def test_generate_compile_model_forward_fullgraph(self):
            self._with_fwp_cache_kinds(super().test_generate_compile_model_forward_fullgraph)

    # --- the FWPCache is not made of transformers' cache layers: the harness asks such models to override these ---
    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        """`GenerationTesterMixin` raises "The cache is not standard! Please overwrite
        `_check_past_key_values_for_generate`" for a cache of other layers; this is the FWPCache version."""
        self.assertIsInstance(past_key_values, FWPCache)
        self.assertEqual(len(past_key_values.layers), config.num_hidden_layers)
        # [rows, heads, key size (after the feature map: head_dim for both variants here), head_dim]
        expected = (batch_size, config.num_heads, getattr(config, "key_dim", config.head_dim), config.head_dim)
        for layer in past_key_values.layers:
            self.assertEqual(layer.seen_tokens, seq_length)
            self.assertEqual(tuple(layer.fast_weights.shape), expected)
            if config.use_short_conv:
                self.assertEqual(layer.conv_tail.shape[:2], (batch_size, config.conv_size - 1))
            else:
                self.assertIsNone(layer.conv_tail)

    def _check_caches_are_equal(self, cache1, cache2):
        """As `GenerationTesterMixin._check_caches_are_equal` ("The cache is not standard! Please overwrite"), for
        FWPCache: the same state in every layer."""
        self.assertIsInstance(cache1, FWPCache)
        self.assertIsInstance(cache2, FWPCache)
        self.assertEqual(len(cache1.layers), len(cache2.layers))
        for layer1, layer2 in zip(cache1.layers, cache2.layers):
            self.assertEqual(layer1.seen_tokens, layer2.seen_tokens)
            for name in ("fast_weights", "z", "conv_tail", "row_tokens"):
                a, b = getattr(layer1, name), getattr(layer2, name)
                self.assertEqual(a is None, b is None, name)
                if a is not None:
                    torch.testing.assert_close(a, b, msg=name)

    # --- skips ---------------------------------------------------------------------------------------------------
    if GENERATION_SKIP_REASON:
        @unittest.skip(reason=f"GenerationTesterMixin is not available: {GENERATION_SKIP_REASON}")
        def test_generation_tester_mixin_inheritance(self):
            pass


class FWPDefaultModelTest(FWPCommonTests, unittest.TestCase):
    """The paper's Delta Net: FWPConfig defaults (delta rule, elu_plus_one, sum norm, post_ln)."""

    variant = {}


class FWPDeltaNetModelTest(FWPCommonTests, unittest.TestCase):
    """The modern DeltaNet variant."""

    variant = dict(block_style="pre_norm", feature_map="identity", qk_norm="l2", use_short_conv=True,
                   use_output_norm=True)


if GENERATION_SKIP_REASON:
    @unittest.skip(reason=GENERATION_SKIP_REASON)
    class FWPGenerationTests(unittest.TestCase):
        """Stands for the GenerationTesterMixin tests that cannot run here (see the reason)."""

        def test_generation_tester_mixin(self):
            pass
