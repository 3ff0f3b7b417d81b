"""transformers' own common model tests (``ModelTesterMixin``, ``ConfigTester``) on the CompreSSM classes, with
heterogeneous per-layer state sizes (2 layers of sizes [8, 3] under a cap of 8), the way transformers' own
``tests/models/mamba/test_modeling_mamba.py`` and ``tests/models/mamba2/test_modeling_mamba2.py`` run them on
``MambaModel`` / ``MambaForCausalLM`` and ``Mamba2Model`` / ``Mamba2ForCausalLM``.

Where the mixins come from
    ``bash .ci/fetch_transformers_tests.sh`` downloads the sdist of exactly the installed transformers version from
    PyPI and extracts its ``tests/`` tree to ``.ci/transformers-tests/<version>/hf_tests/``, renamed from ``tests`` to
    ``hf_tests`` (absolute ``from tests.`` imports rewritten, ``__init__.py`` files added). This module puts
    ``.ci/transformers-tests/<version>`` on ``sys.path`` and imports ``hf_tests.test_modeling_common``: the name
    ``hf_tests`` cannot clash with this repository's own ``tests/`` folder (which the conftest makes importable as
    ``tests`` from the repository root) nor with this module's name. When that folder is missing, this module fails
    (``CI`` set) or is skipped (otherwise) with a message naming the fetch script.

What the sdist lacks (transformers 5.24 and 5.25 alike)
    The sdist ships only the top-level ``tests/*.py`` files. Three modules those files import are not in it, so this
    module registers stand-ins for them in ``sys.modules`` before the import (only when the file is really absent: a
    complete ``tests/`` tree placed under ``hf_tests/`` is used as it is):

    * ``hf_tests.generation.test_utils``: the stand-in ``GenerationTesterMixin`` has no tests, so transformers'
      ``generate`` tests do not run here; ``test_generation_tester_mixin_inheritance`` (which would pass vacuously)
      is skipped, and ``test_causal_lm_can_generate`` checks its premise instead (the LM class can ``generate``).
    * ``hf_tests.exporters.test_export``: the stand-in ``ExportTesterMixin`` has no tests (``torch.export`` tests
      do not run here).
    * ``hf_tests.utils.test_configuration_utils``: without ``config_common_kwargs``, ``ConfigTester``'s
      ``check_config_arguments_init`` cannot run; ``test_config`` runs every other ``run_common_tests`` step and
      ``test_config_common_kwargs`` is skipped with that reason.

    The mixins also import ``parameterized`` (transformers' ``testing`` extra): a missing package fails/skips the
    module like a missing folder. ``PipelineTesterMixin``, which the stock testers also inherit, is left out: its tests
    build pipelines from tiny checkpoints and tokenizers on the Hub, which CI cannot reach.

Making the mixins treat our classes as they treat the stock ones
    Many mixin tests pick the classes they exercise by name from transformers' auto tables
    (``MODEL_MAPPING_NAMES``, ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, ``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES``,
    ... keyed by ``config.model_type``), and silently pass over a class that is not listed there (e.g.
    ``test_base_model_prefix_loads_base_weights``, ``test_training``, ``test_causal_lm_loss_honors_shift_labels``).
    ``AutoModel*.register`` does not add to those tables, so while a test class runs, each table that lists the stock
    ``mamba`` / ``mamba2`` model type gets our model type with the matching CompreSSM class (``MambaModel`` ->
    ``CompreSSMMambaModel``, ...), and ``MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES`` gets
    ``CompreSSMMambaForSequenceClassification`` (registered with ``AutoModelForSequenceClassification``); the entries
    are removed after the class. ``test_can_init_all_missing_weights_before_2023`` is set because that test skips any
    model whose configuration file has no ``# Copyright 2023`` (or later) line, and ours have none; the stock Mamba
    (2024) configuration files do, so the stock testers run it.
"""

import os
import sys
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from transformers.models.auto import modeling_auto


pytestmark = pytest.mark.compat


REPO = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = ".ci/fetch_transformers_tests.sh"
TESTS_ROOT = REPO / ".ci" / "transformers-tests" / transformers.__version__
HF_TESTS = TESTS_ROOT / "hf_tests"


def _unavailable(reason: str) -> None:
    """Fail the module in CI (the environment variable CI is set), skip it elsewhere."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so this is an error)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not (HF_TESTS / "test_modeling_common.py").is_file():
    _unavailable(
        f"transformers {transformers.__version__}'s common model tests are not in {HF_TESTS}: run "
        f"`bash {FETCH_SCRIPT}` (with the Python that runs the tests) to fetch them from the transformers sdist."
    )


# ---------------------------------------------------------------------------------------------- stand-ins
class _ExportTesterMixinStandIn:
    """Stand-in for ``tests/exporters/test_export.py::ExportTesterMixin`` (not in the sdist): no tests."""


class _GenerationTesterMixinStandIn:
    """Stand-in for ``tests/generation/test_utils.py::GenerationTesterMixin`` (not in the sdist): no tests."""


# module (relative to hf_tests) -> (attribute, stand-in value)
_STAND_INS = {
    "exporters.test_export": ("ExportTesterMixin", _ExportTesterMixinStandIn),
    "generation.test_utils": ("GenerationTesterMixin", _GenerationTesterMixinStandIn),
    "utils.test_configuration_utils": ("config_common_kwargs", None),
}
ABSENT = set()  # the modules above that the extracted tree lacks


def _register_stand_ins() -> None:
    for rel, (attr, value) in _STAND_INS.items():
        package, name = rel.split(".")
        if (HF_TESTS / package / f"{name}.py").is_file():
            continue
        ABSENT.add(rel)
        package_name = f"hf_tests.{package}"
        if package_name not in sys.modules and not (HF_TESTS / package / "__init__.py").is_file():
            stub_package = types.ModuleType(package_name, f"stand-in: the transformers sdist has no tests/{package}/")
            stub_package.__path__ = []
            sys.modules[package_name] = stub_package
        module = types.ModuleType(f"hf_tests.{rel}", f"stand-in: the transformers sdist has no tests/{rel}.py")
        setattr(module, attr, value)
        sys.modules[f"hf_tests.{rel}"] = module


if str(TESTS_ROOT) not in sys.path:
    sys.path.insert(0, str(TESTS_ROOT))
_register_stand_ins()
_missing_package = None
try:
    import hf_tests
    from hf_tests.generation.test_utils import GenerationTesterMixin
    from hf_tests.test_configuration_common import ConfigTester
    from hf_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
except ModuleNotFoundError as err:
    if (err.name or "").split(".")[0] == "hf_tests":
        raise
    _missing_package = err.name
if _missing_package is not None:
    _unavailable(
        f"transformers' common model tests need the Python package {_missing_package!r} (transformers' `testing` "
        f"extra): pip install it."
    )
assert Path(hf_tests.__file__).resolve().parent == HF_TESTS.resolve(), hf_tests.__file__

from hf_compressssm import (  # noqa: E402
    CompreSSMMamba2Config,
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Model,
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
    CompreSSMMambaModel,
)


GENERATION_ABSENT = "generation.test_utils" in ABSENT
CONFIG_KWARGS_ABSENT = "utils.test_configuration_utils" in ABSENT
NO_GENERATION_MIXIN = (
    f"the transformers {transformers.__version__} sdist does not ship tests/generation/test_utils.py: "
    "GenerationTesterMixin is a stand-in without tests, so this check would pass vacuously (test_causal_lm_can_generate "
    "checks that the LM class can generate instead)"
)
NO_CONFIG_KWARGS = (
    f"the transformers {transformers.__version__} sdist does not ship tests/utils/test_configuration_utils.py, "
    "whose config_common_kwargs ConfigTester.check_config_arguments_init needs"
)
STATE_SIZE = 8
STATE_SIZES = [8, 3]  # heterogeneous: the second layer is compressed


# ---------------------------------------------------------------------------------------------- shared
class _CompreSSMModelTesterBase:
    """What ModelTesterMixin reads from a model tester (sizes as in the stock Mamba testers, batch 14, length 7)."""

    config_class = None

    def __init__(
        self,
        parent,
        batch_size=14,
        seq_length=7,
        is_training=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        type_sequence_label_size=2,
        num_labels=3,
        num_choices=4,
        state_size=STATE_SIZE,
        state_sizes=STATE_SIZES,
        tie_word_embeddings=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.type_sequence_label_size = type_sequence_label_size
        self.num_labels = num_labels
        self.num_choices = num_choices
        self.state_size = state_size
        self.state_sizes = list(state_sizes)
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = vocab_size - 1
        self.eos_token_id = vocab_size - 1
        self.pad_token_id = vocab_size - 1

    def config_values(self) -> dict:
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            state_size=self.state_size,
            state_sizes=list(self.state_sizes),
            use_cache=True,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
            num_labels=self.num_labels,
        )

    def get_config(self):
        return self.config_class(**self.config_values())

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        # Padding at random positions (the last token always kept): exercises the mixers' padding masks.
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        sequence_labels = token_labels = None
        if self.use_labels:
            sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
        return self.get_config(), input_ids, attention_mask, sequence_labels, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, *_ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": attention_mask}

    # -------------------------------------------------------------- family checks (as the stock testers have)
    def create_and_check_model(self, config, input_ids, *args):
        config.output_hidden_states = True
        model = self.parent.base_model_class(config).eval()
        result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(len(result.hidden_states), config.num_hidden_layers + 1)
        self.parent.assertEqual(model.state_sizes(), self.state_sizes)

    def create_and_check_causal_lm(self, config, input_ids, *args):
        model = self.parent.causal_lm_class(config).eval()
        result = model(input_ids, labels=input_ids)
        self.parent.assertEqual(result.loss.shape, ())
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))

    def create_and_check_state_equivalency(self, config, input_ids, *args):
        """A prefix with ``use_cache=True`` then one token from the returned cache equals one full forward."""
        model = self.parent.base_model_class(config).eval()
        with torch.no_grad():
            whole = model(input_ids).last_hidden_state
            first = model(input_ids[:, :-1], use_cache=True)
            cache = first.cache
            second = model(input_ids[:, -1:], use_cache=True, cache=cache)
        torch.testing.assert_close(
            torch.cat([first.last_hidden_state, second.last_hidden_state], dim=1), whole, atol=1e-5, rtol=1e-5
        )
        for layer, size in enumerate(self.state_sizes):
            self.parent.assertEqual(self.parent.recurrent_state_size(cache.get_recurrent_state(layer)), size)

    def create_and_check_lm_head_forward_and_backwards(self, config, input_ids, *args, gradient_checkpointing=False):
        model = self.parent.causal_lm_class(config)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        result = model(input_ids, labels=input_ids)
        self.parent.assertEqual(result.loss.shape, ())
        result.loss.backward()


class _CompreSSMTestMixin:
    """The family-specific tests shared by both families (stock: test_mamba_model, test_mamba_lm_head_model, ...)."""

    base_model_class = None
    causal_lm_class = None
    stock_model_type = None  # the transformers model type whose auto-table entries ours mirror
    extra_auto_names = {}  # table name -> our class, for heads the stock family lacks
    # The stock Mamba testers run it (their configuration files carry a 2024 copyright line); see the docstring.
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def auto_names(cls) -> dict:
        """{auto table name: our class name} for this family (see the module docstring)."""
        ours = {c.__name__ for c in cls.all_model_classes}
        names = {}
        for table_name, table in vars(modeling_auto).items():
            if table_name.endswith("_MAPPING_NAMES") and isinstance(table, dict):
                stock = table.get(cls.stock_model_type)
                if isinstance(stock, str) and f"CompreSSM{stock}" in ours:
                    names[table_name] = f"CompreSSM{stock}"
        names.update({table_name: c.__name__ for table_name, c in cls.extra_auto_names.items()})
        return names

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        model_type = cls.all_model_classes[0].config_class.model_type
        for table_name, class_name in cls.auto_names().items():
            patcher = mock.patch.dict(getattr(modeling_auto, table_name), {model_type: class_name})
            patcher.start()
            cls.addClassCleanup(patcher.stop)

    def _check_caches_are_equal(self, cache1, cache2):
        """Layer by layer, equal conv and recurrent states: the hook test_bc_cache_name_forward calls when a tester
        defines it (stock testers of recurrent models define their own). Without it the mixin falls back to comparing
        ``cache.get_seq_length()``, which transformers 5.24 refuses on a cache of only linear-attention layers (the
        stock Mamba classes fail that fallback too)."""
        self.assertEqual(len(cache1), len(cache2))
        for layer in range(len(cache1)):
            for getter in ("get_conv_state", "get_recurrent_state"):
                torch.testing.assert_close(getattr(cache1, getter)(layer), getattr(cache2, getter)(layer))

    def test_auto_names_mirror_the_stock_family(self):
        names = self.auto_names()
        self.assertEqual(names.get("MODEL_MAPPING_NAMES"), self.base_model_class.__name__)
        self.assertEqual(names.get("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"), self.causal_lm_class.__name__)

    def test_config(self):
        if CONFIG_KWARGS_ABSENT:  # every run_common_tests step but the one that needs config_common_kwargs
            with mock.patch.object(self.config_tester, "check_config_arguments_init", lambda: None):
                self.config_tester.run_common_tests()
        else:
            self.config_tester.run_common_tests()

    def test_config_common_kwargs(self):
        if CONFIG_KWARGS_ABSENT:
            self.skipTest(NO_CONFIG_KWARGS)
        self.config_tester.check_config_arguments_init()

    def test_per_layer_config_state_sizes(self):
        config = self.model_tester.get_config()
        self.assertEqual(config.state_sizes, STATE_SIZES)
        self.assertEqual([config.per_layer_config[i].state_size for i in range(len(STATE_SIZES))], STATE_SIZES)

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_lm_head_model(self):
        self.model_tester.create_and_check_causal_lm(*self.model_tester.prepare_config_and_inputs())

    def test_state_equivalency(self):
        self.model_tester.create_and_check_state_equivalency(*self.model_tester.prepare_config_and_inputs())

    def test_lm_head_forward_and_backwards(self):
        self.model_tester.create_and_check_lm_head_forward_and_backwards(*self.model_tester.prepare_config_and_inputs())

    def test_causal_lm_can_generate(self):
        self.assertTrue(self.causal_lm_class.can_generate(), f"{self.causal_lm_class.__name__} cannot generate()")
        self.assertIn(self.causal_lm_class, self.all_generative_model_classes)

    def test_model_weights_reload_no_missing_tied_weights(self):
        # The test overwrites model.safetensors with one unrelated tensor and expects from_pretrained to load with every
        # parameter "missing" (initialised at random). CompreSSM models refuse that on purpose: a checkpoint that
        # lacks SSM layer tensors is an error (hf_compressssm/models/modeling_compressssm_common.py,
        # _check_loading_info; tested in tests/test_strict_loading.py). Initialising everything stays possible
        # explicitly: from_pretrained(None, config=..., state_dict={}) (test_can_init_all_missing_weights passes).
        self.skipTest("strict loading refuses a checkpoint without the SSM layer tensors, by design")

    def test_generation_tester_mixin_inheritance(self):
        if GENERATION_ABSENT:
            self.skipTest(NO_GENERATION_MIXIN)
        super().test_generation_tester_mixin_inheritance()


# ---------------------------------------------------------------------------------------------- Mamba-1
class CompreSSMMambaModelTester(_CompreSSMModelTesterBase):
    config_class = CompreSSMMambaConfig

    def __init__(self, parent, intermediate_size=32, hidden_act="silu", **kwargs):
        super().__init__(parent, **kwargs)
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act

    def config_values(self) -> dict:
        values = super().config_values()
        values.update(intermediate_size=self.intermediate_size, hidden_act=self.hidden_act)
        return values


class CompreSSMMambaConformanceTest(
    _CompreSSMTestMixin, ModelTesterMixin, GenerationTesterMixin, unittest.TestCase
):  # stock: MambaModelTest(ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin, unittest.TestCase)
    all_model_classes = (CompreSSMMambaModel, CompreSSMMambaForCausalLM, CompreSSMMambaForSequenceClassification)
    base_model_class = CompreSSMMambaModel
    causal_lm_class = CompreSSMMambaForCausalLM
    stock_model_type = "mamba"
    extra_auto_names = {"MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": CompreSSMMambaForSequenceClassification}
    has_attentions = False  # as stock: Mamba does not support attentions
    test_missing_keys = False  # as stock MambaModelTest

    def setUp(self):
        self.model_tester = CompreSSMMambaModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=CompreSSMMambaConfig, n_embd=37, common_properties=["hidden_size", "num_hidden_layers"]
        )

    @staticmethod
    def recurrent_state_size(state: torch.Tensor) -> int:
        return state.shape[-1]  # (batch, intermediate, N)


# ---------------------------------------------------------------------------------------------- Mamba-2
class CompreSSMMamba2ModelTester(_CompreSSMModelTesterBase):
    """Hidden 16, 4 heads of 8 (expand 2), 2 groups (so the per-group size N matters), conv 4: the repository's tiny
    Mamba-2 shapes, with chunk 4 so that the 7-token inputs span a full and a partial chunk of the SSD scan."""

    config_class = CompreSSMMamba2Config

    def __init__(self, parent, hidden_size=16, num_heads=4, head_dim=8, n_groups=2, chunk_size=4, **kwargs):
        super().__init__(parent, hidden_size=hidden_size, tie_word_embeddings=False, **kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.n_groups = n_groups
        self.chunk_size = chunk_size

    def config_values(self) -> dict:
        values = super().config_values()
        values.update(
            num_heads=self.num_heads, head_dim=self.head_dim, n_groups=self.n_groups, chunk_size=self.chunk_size
        )
        return values


class CompreSSMMamba2ConformanceTest(
    _CompreSSMTestMixin, ModelTesterMixin, GenerationTesterMixin, unittest.TestCase
):  # stock: Mamba2ModelTest(ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin, unittest.TestCase)
    all_model_classes = (CompreSSMMamba2Model, CompreSSMMamba2ForCausalLM)
    base_model_class = CompreSSMMamba2Model
    causal_lm_class = CompreSSMMamba2ForCausalLM
    stock_model_type = "mamba2"
    has_attentions = False  # as stock: Mamba does not support attentions
    test_missing_keys = False  # as stock Mamba2ModelTest

    def setUp(self):
        self.model_tester = CompreSSMMamba2ModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=CompreSSMMamba2Config, n_embd=37, common_properties=["hidden_size", "num_hidden_layers"]
        )

    @staticmethod
    def recurrent_state_size(state: torch.Tensor) -> int:
        return state.shape[-1]  # (batch, heads, head_dim, N)
