"""The CUDA branch (mamba_ssm + causal_conv1d) run on CPU tensors with emulated kernels (tests/cuda_emulation.py).

The installed library code runs as on a GPU; only the compiled kernels are replaced by the libraries' reference
functions behind the kernels' own input checks, so a call the real kernel would reject fails here. Compared with the
CPU path (numba/torch) on the same weights: forward, every gradient, generate with cache, a Trainer run with cuts;
for uniform sizes also against stock ``MambaForCausalLM`` on the same emulated kernels. Skipped unless the packages
are installed (``.ci/run`` installs them without compiling CUDA).
"""

import contextlib
import copy
import logging

import pytest
import torch
from cuda_emulation import KernelCheckError, emulated_cuda, missing_packages, stock_mamba_patches
from helpers import random_ids, tiny_lm
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_compressssm import CompreSSMCallback
from hf_compressssm.families import find_mixers
from hf_compressssm.models import kernel_policy


pytestmark = pytest.mark.compat


if missing_packages():
    pytest.skip(f"CUDA emulation needs {missing_packages()} (installed by .ci/run)", allow_module_level=True)

SIZES = [16, 7, 3]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(kernel_policy.ENV_VAR, raising=False)


def emulated(stock: bool = False, as_cuda: bool = True):
    """The emulated CUDA context; CPU tensors count as CUDA for our kernel policy when ``as_cuda``."""
    return emulated_cuda(
        device_hooks=((kernel_policy, "_device_type"),) if as_cuda else (),
        patches=tuple(stock_mamba_patches()) if stock else (),
        import_caches=(kernel_policy._IMPORTS,),
    )


def lm(**overrides):
    values = dict(num_hidden_layers=3, state_size=16, state_sizes=SIZES)
    values.update(overrides)
    return tiny_lm(**values)


def run_train_step(model, ids, mask=None, **kwargs):
    """Training-mode forward + backward: (logits, {name: grad})."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def max_rel_grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in a)


@contextlib.contextmanager
def transformers_warnings():
    """Warning messages of the transformers and hf_compressssm loggers; ``warning_once`` reset first."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    hf_logging.warning_once.cache_clear()
    roots = [logging.getLogger("transformers"), logging.getLogger("hf_compressssm")]
    handler = Keep(level=logging.WARNING)
    for root in roots:
        root.addHandler(handler)
    try:
        yield records
    finally:
        for root in roots:
            root.removeHandler(handler)


# ------------------------------------------------------------------------------------------ agreement with CPU


def test_fused_training_forward_and_every_gradient_match_the_cpu_path():
    model = lm()
    ids = random_ids(batch=2, length=12)
    ref_logits, ref_grads = run_train_step(model, ids)
    with emulated() as calls:
        logits, grads = run_train_step(model, ids)
    assert calls["mamba_inner_fn"] == 3 and calls["selective_scan_bwd"] == 3 and calls["causal_conv1d_bwd"] == 3
    assert (logits - ref_logits).abs().max() < 1e-5
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5


def test_eval_forward_and_generate_with_cache_match_the_cpu_path():
    model = lm().eval()
    ids = random_ids(batch=2, length=10)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref = model.generate(ids, **kwargs)
    with emulated() as calls, torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, **kwargs)
    assert calls["mamba_inner_fn"] == 0 and calls["selective_scan_fwd"] == 6 and calls["causal_conv1d_fwd"] == 6
    assert calls["causal_conv1d_update"] == 15 and calls["selective_state_update"] == 15  # 5 decode steps x 3
    assert (logits - ref_logits).abs().max() < 1e-5
    assert torch.equal(gen.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(gen.scores, ref.scores)) < 1e-5


def test_unfused_training_path_gradients_match(monkeypatch):
    """Adapters (non-plain projections) turn the fused path off: causal_conv1d + selective_scan_fn, autograd."""
    model = lm()
    ids = random_ids(batch=2, length=12)
    ref_logits, ref_grads = run_train_step(model, ids)
    for mixer in find_mixers(model):
        monkeypatch.setattr(mixer, "x_proj", _Wrapped(mixer.x_proj))
    with emulated() as calls:
        logits, grads = run_train_step(model, ids)
    assert calls["mamba_inner_fn"] == 0 and calls["selective_scan_bwd"] == 3 and calls["causal_conv1d_bwd"] == 3
    assert (logits - ref_logits).abs().max() < 1e-5
    grads = {k.replace("x_proj.inner.", "x_proj."): v for k, v in grads.items()}
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5


class _Wrapped(torch.nn.Module):
    """Stands for a PEFT wrapper: called as a module, not a plain nn.Linear."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.weight = inner.weight

    def forward(self, x):
        return self.inner(x)


def _train_with_cuts(tmp_path, model):
    class Blocks(torch.utils.data.Dataset):
        ids = random_ids(batch=20, length=12, seed=1)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    callback = CompreSSMCallback(tau=0.3, reduction_steps=[2, 4])
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[callback]).train()
    return model


def test_trainer_run_with_cuts_matches_the_cpu_path(tmp_path):
    base = lm(state_sizes=[16, 16, 16])
    cpu = _train_with_cuts(tmp_path / "cpu", copy.deepcopy(base))
    with emulated() as calls:
        emu = _train_with_cuts(tmp_path / "emu", copy.deepcopy(base))
    assert calls["mamba_inner_fn"] > 0
    assert emu.state_sizes() == cpu.state_sizes() and min(cpu.state_sizes()) < 16
    kept = [[layer["kept"] for layer in h["layers"]] for h in emu.compression_history]
    assert kept == [[layer["kept"] for layer in h["layers"]] for h in cpu.compression_history]
    ref = dict(cpu.named_parameters())
    assert max((p - ref[n]).abs().max().item() for n, p in emu.named_parameters()) < 1e-4


# -------------------------------------------------------------------------------- stock transformers Mamba


def test_uniform_sizes_match_stock_mamba_on_the_same_emulated_kernels():
    model = lm(state_sizes=[8, 8, 8], state_size=8)
    stock = model.to_mamba()
    ids = random_ids(batch=2, length=12)
    with emulated(stock=True) as calls:
        logits, grads = run_train_step(model, ids)
        assert calls["mamba_inner_fn"] == 3
        stock_logits, stock_grads = run_train_step(stock, ids)
        assert calls["mamba_inner_fn"] == 6  # stock ran the same fused kernel
        model.eval(), stock.eval()
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=5, do_sample=False)
            stock_gen = stock.generate(ids, max_new_tokens=5, do_sample=False)
        assert calls["selective_state_update"] == 24  # 4 decode steps x 3 layers x 2 models
    assert torch.equal(logits, stock_logits)
    assert max_rel_grad_diff(grads, stock_grads) == 0.0
    assert torch.equal(gen, stock_gen)


def test_channel_last_alignment_is_checked_and_our_conv_layout_passes_it():
    """D = 20 is not a multiple of 8: the kernel rejects the channel-last view stock transformers passes; the
    mixer hands it an L-contiguous copy instead."""
    model = lm(hidden_size=10, state_sizes=[8, 8, 8], state_size=8)  # intermediate size 20
    ids = random_ids(batch=2, length=8)
    with torch.no_grad():
        ref = model.eval()(ids).logits
    ref_logits, ref_grads = run_train_step(model, ids)
    with emulated(stock=True) as calls:
        with torch.no_grad():
            logits = model.eval()(ids).logits
        assert calls["causal_conv1d_fwd"] == 3
        train_logits, grads = run_train_step(model, ids)
        stock = model.to_mamba().eval()
        with pytest.raises(KernelCheckError, match="divisible by 8"), torch.no_grad():
            stock(ids)
    assert (logits - ref).abs().max() < 1e-5 and (train_logits - ref_logits).abs().max() < 1e-5
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5


# ------------------------------------------------------------------------------------ kernel limits, fallbacks


def test_float64_falls_back_with_one_warning_and_errors_when_forced():
    model = lm().double().eval()
    ids = random_ids()
    with torch.no_grad():
        ref = model(ids).logits
    with emulated() as calls, transformers_warnings() as logs, torch.no_grad():
        out = model(ids).logits
        model(ids)
        assert sum(calls.values()) == 0
        assert sum("float64" in m for m in logs) == 2  # one per message (scan, conv), not one per call/layer
        model.config.scan_backend = "mamba_ssm"
        forced = lm(scan_backend="mamba_ssm").double()
        with pytest.raises(RuntimeError, match="forces mamba_ssm, but its kernel cannot take dtype torch.float64"):
            forced(ids)
        assert sum(calls.values()) == 0
    assert torch.equal(out, ref)


def test_state_size_above_256_uses_the_torch_scan_or_errors_when_forced():
    model = lm(hidden_size=8, num_hidden_layers=1, state_size=260, state_sizes=[260]).eval()
    ids = random_ids(batch=1, length=6)
    with torch.no_grad():
        ref = model(ids).logits
    with emulated() as calls, transformers_warnings() as logs, torch.no_grad():
        out = model(ids).logits
        assert calls["selective_scan_fwd"] == 0 and calls["causal_conv1d_fwd"] == 1  # conv still on the kernel
        assert any("state size 260 > 256" in m for m in logs)
        forced = lm(hidden_size=8, num_hidden_layers=1, state_size=260, state_sizes=[260], scan_backend="mamba_ssm")
        with pytest.raises(RuntimeError, match="state size 260 > 256"):
            forced(ids)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(conv_kernel=5), "conv_kernel=5"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ],
)
def test_conv_limits_use_the_torch_conv_and_no_fused_path(overrides, reason):
    model = lm(**overrides)
    ids = random_ids(batch=2, length=12)
    ref_logits, ref_grads = run_train_step(model, ids)
    with emulated() as calls, transformers_warnings() as logs:
        logits, grads = run_train_step(model, ids)
    assert calls["causal_conv1d_fwd"] == 0 and calls["mamba_inner_fn"] == 0 and calls["selective_scan_bwd"] == 3
    assert sum(reason in m for m in logs) == 1
    assert (logits - ref_logits).abs().max() < 1e-5
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5


def test_mamba_ssm_without_causal_conv1d_trains_unfused(monkeypatch):
    model = lm()
    ids = random_ids(batch=2, length=12)
    ref_logits, ref_grads = run_train_step(model, ids)
    with emulated() as calls, transformers_warnings() as logs:
        interface = __import__("sys").modules["mamba_ssm.ops.selective_scan_interface"]
        monkeypatch.setattr(interface, "causal_conv1d_fwd_function", None)  # as imported without causal_conv1d
        monkeypatch.setitem(kernel_policy._IMPORTS, "causal_conv1d", None)
        logits, grads = run_train_step(model, ids)
        monkeypatch.undo()
    assert calls["mamba_inner_fn"] == 0 and calls["causal_conv1d_fwd"] == 0 and calls["selective_scan_bwd"] == 3
    assert any("causal_conv1d is not installed" in m for m in logs)
    assert (logits - ref_logits).abs().max() < 1e-5
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5


def test_padded_batch_trains_the_same_as_the_unfused_path_unlike_stock():
    """Left padding: the fused kernel would not re-mask after the convolution; we fall back, stock does not."""
    model = lm(state_sizes=[8, 8, 8], state_size=8)
    with torch.no_grad():  # initialised at zero; trained biases are not (silu(bias) is what leaks past the mask)
        for mixer in find_mixers(model):
            mixer.conv1d.bias.normal_(0.0, 0.5)
    ids = random_ids(batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ref_logits, ref_grads = run_train_step(model, ids, mask)
    stock = model.to_mamba()
    stock_ref, _ = run_train_step(stock, ids, mask)
    with emulated(stock=True) as calls:
        logits, grads = run_train_step(model, ids, mask)
        assert calls["mamba_inner_fn"] == 0 and calls["selective_scan_bwd"] == 3
        run_train_step(model, ids, torch.ones_like(ids))  # no padding: fused
        assert calls["mamba_inner_fn"] == 3
        stock_logits, _ = run_train_step(stock, ids, mask)
    assert (logits - ref_logits).abs().max() < 1e-5
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5
    assert (stock_logits - stock_ref).abs().max() > 1e-3  # stock's fused path differs on padded rows


# ---------------------------------------------------------------------------------------- CPU stays on CPU


def test_cpu_tensors_never_reach_the_kernels_and_get_no_install_advice():
    """Packages importable (emulated), tensors on CPU: no kernel call, no advice to install CUDA packages."""
    model = lm()
    ids = random_ids(batch=2, length=10)
    with emulated(as_cuda=False) as calls, transformers_warnings() as logs:
        run_train_step(model, ids)
        model.eval()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=3, do_sample=False)
        with pytest.raises(RuntimeError, match="CUDA tensors only"):
            lm(scan_backend="mamba_ssm")(ids)
    assert sum(calls.values()) == 0
    assert not [m for m in logs if "install" in m.lower()]


def test_emulation_leaves_the_process_as_it_found_it():
    import sys

    before = {k for k in sys.modules if k.split(".")[0] in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda")}
    imports = dict(kernel_policy._IMPORTS)
    device_type = kernel_policy._device_type
    with emulated():
        assert kernel_policy._device_type(torch.zeros(1)) == "cuda"
        assert "selective_scan_cuda" in sys.modules
    after = {k for k in sys.modules if k.split(".")[0] in ("mamba_ssm", "causal_conv1d", "selective_scan_cuda")}
    assert after == before and kernel_policy._IMPORTS == imports and kernel_policy._device_type is device_type
