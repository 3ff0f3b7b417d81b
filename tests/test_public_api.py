"""The shipped modeling files stand on transformers' public API, and the models hold against stock transformers.

Every file of ``hf_compressssm/models`` is copied next to saved weights as remote code, so it must load on every
transformers release of the declared range: it may import only the names in ``ALLOWED`` below (top-level exports of
transformers and its ``modeling_outputs`` module, torch, huggingface_hub's public ``dataclasses`` module, the
standard library and its sibling files). Parity with stock is checked on each family at uniform sizes: the same
initialisation for the same seed, logits and every gradient, cached generation with left padding.
"""

import ast
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_ids, tiny_config
from mamba2_helpers import tiny_mamba2_config, tiny_mamba2_values
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import hf_compressssm
from hf_compressssm import CompreSSMMamba2ForCausalLM, CompreSSMMambaForCausalLM


pytestmark = pytest.mark.compat  # also run on the declared minimum versions (.ci/run's second pass)

MODELS = Path(hf_compressssm.__file__).parent / "models"
SHIPPED = sorted(p for p in MODELS.glob("*.py") if p.name != "__init__.py")

# module -> names it may be imported from (None: the module itself, any attribute)
ALLOWED_TRANSFORMERS = {
    "transformers": {
        "BambaConfig",
        "BambaForCausalLM",
        "DynamicCache",
        "GenerationMixin",
        "GradientCheckpointingLayer",
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        "MambaConfig",
        "MambaForCausalLM",
        "Mamba2Config",
        "Mamba2ForCausalLM",
        "NemotronHConfig",
        "NemotronHForCausalLM",
        "PreTrainedModel",
        "Zamba2Config",
        "Zamba2ForCausalLM",
        "initialization",  # guarded: a missing module falls back to torch.nn.init with one warning
        "logging",
    },
    "transformers.modeling_outputs": {"ModelOutput", "SequenceClassifierOutput"},
}
ALLOWED_OTHER = {"torch", "numba", "numpy", "huggingface_hub.dataclasses"}  # (torch, numba, numpy: any submodule)
OPTIONAL_KERNELS = ("mamba_ssm", "causal_conv1d", "mambapy")  # imported by name at run time, behind try/except


def _imports(path: Path):
    """(module, name or None, line) for every import statement of ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            for alias in node.names:
                yield module, alias.name, node.lineno


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_import_only_public_names(path):
    bad = []
    for module, name, line in _imports(path):
        where = f"{path.name}:{line} {module}{'.' + name if name else ''}"
        if module.startswith("."):
            sibling = module.lstrip(".") or name
            if module.startswith("..") or not (MODELS / f"{sibling}.py").is_file():
                bad.append(f"{where}: relative imports must name a sibling file (remote code copies only those)")
        elif module.split(".")[0] in sys.stdlib_module_names or module == "__future__":
            continue
        elif module.startswith("transformers"):
            if module.startswith("transformers.models") or any(part.startswith("_") for part in module.split(".")):
                bad.append(f"{where}: transformers.models.* and private modules move between releases")
            elif module not in ALLOWED_TRANSFORMERS or name not in ALLOWED_TRANSFORMERS[module]:
                bad.append(f"{where}: not in the allow-list of this test")
        elif module.split(".")[0] not in ALLOWED_OTHER and module not in ALLOWED_OTHER:
            bad.append(f"{where}: not in the allow-list of this test")
        if name is not None and name.startswith("_") and not module.startswith("."):
            bad.append(f"{where}: private name")
    assert not bad, "\n".join(bad)


def test_optional_kernels_are_imported_by_name_only():
    for path in SHIPPED:
        for module, _, line in _imports(path):
            assert not module.startswith(OPTIONAL_KERNELS), f"{path.name}:{line} imports {module} at import time"


def test_every_shipped_file_is_in_a_family_unit():
    from hf_compressssm.hub.publish import REMOTE_CODE_FILES_BY_MODEL_TYPE

    shipped = {name for files in REMOTE_CODE_FILES_BY_MODEL_TYPE.values() for name in files}
    assert {p.name for p in SHIPPED} <= shipped


# ---------------------------------------------------------------- parity with stock, both families
def _pair(family: str, seed: int = 0):
    """(stock model, ours) built from the same seed at uniform sizes."""
    if family == "mamba":
        values = {k: v for k, v in tiny_config().to_dict().items() if k in MambaConfig().to_dict()}
        torch.manual_seed(seed)
        stock = MambaForCausalLM(MambaConfig(**{k: values[k] for k in values if k not in _SKIP}))
        torch.manual_seed(seed)
        ours = CompreSSMMambaForCausalLM(tiny_config())
    else:
        torch.manual_seed(seed)
        stock = Mamba2ForCausalLM(Mamba2Config(**tiny_mamba2_values()))
        torch.manual_seed(seed)
        ours = CompreSSMMamba2ForCausalLM(tiny_mamba2_config())
    return stock, ours


_SKIP = {"model_type", "architectures", "transformers_version", "auto_map", "dtype", "intermediate_size"}
FAMILIES = ["mamba", "mamba2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_initialisation_as_stock(family):
    stock, ours = _pair(family)
    theirs, mine = stock.state_dict(), ours.state_dict()
    assert list(theirs) == list(mine)
    for key in theirs:
        assert torch.equal(theirs[key], mine[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_every_gradient_match_stock(family, monkeypatch):
    monkeypatch.setenv("HF_COMPRESSSSM_SCAN_BACKEND", "torch")
    stock, ours = _pair(family, seed=3)
    ids = random_ids(length=19)
    out = {}
    for name, model in (("stock", stock), ("ours", ours)):
        model.train()
        result = model(ids, labels=ids, use_cache=False)
        result.loss.backward()
        out[name] = (result.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(out["ours"][0], out["stock"][0], atol=1e-5, rtol=1e-5)
    for name, grad in out["stock"][1].items():
        torch.testing.assert_close(out["ours"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_cached_generation_matches_stock(family):
    stock, ours = _pair(family, seed=5)
    ids = random_ids(batch=2, length=6)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding in the first row
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.eval().generate(ids, **kwargs), stock.eval().generate(ids, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_code_without_the_package_or_numba_runs_on_torch(family, tmp_path):
    """A folder loaded with trust_remote_code in a process that has neither hf_compressssm nor numba."""
    import os
    import subprocess

    from helpers import BLOCK_PACKAGE

    _, ours = _pair(family, seed=7)
    ours.eval()
    ids = random_ids()
    with torch.no_grad():
        expected = ours(ids).logits
    ours.save_pretrained(tmp_path / "model")
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = (
        BLOCK_PACKAGE
        + "sys.modules['numba'] = None  # import numba -> ImportError\n"
        + f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
data = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(model(data['ids']).logits, data['logits'], atol=1e-4, rtol=1e-4)
assert sys.modules.get('numba') is None
print('REMOTE_OK', type(model).__name__)
"""
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_COMPRESSSSM_SCAN_BACKEND")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"REMOTE_OK {type(ours).__name__}" in result.stdout
