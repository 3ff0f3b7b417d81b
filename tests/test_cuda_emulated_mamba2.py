"""Mamba-2's CUDA branch (mamba_ssm SSD kernels + causal_conv1d) on CPU tensors with emulated kernels.

``tests/cuda_emulation.py``: the installed library code runs as on a GPU (``MambaSplitConv1dScanCombinedFn``,
``MambaChunkScanCombinedFn``, ``causal_conv1d``'s functions); only the triton launchers and compiled kernels are
replaced by ``mamba_ssm``/``causal_conv1d`` reference functions behind their input checks. Compared with the CPU
torch path on the same weights, layers with different N: forward, every gradient, cached generate, a Trainer run
with cuts; stock ``Mamba2ForCausalLM`` on the same kernels. Skipped unless the packages are installed.
"""

import copy
import importlib.util
import sys

import pytest
import torch
from cuda_emulation import KernelCheckError, emulated_cuda, missing_packages, ssd_patches, stock_mamba2_patches
from helpers import random_ids
from mamba2_helpers import tiny_mamba2_lm
from test_cuda_emulated import max_rel_grad_diff, run_train_step, transformers_warnings
from transformers import Trainer, TrainingArguments

from hf_compressssm import CompreSSMCallback
from hf_compressssm.families import find_mixers
from hf_compressssm.models import kernel_policy


pytestmark = pytest.mark.compat


if missing_packages():
    pytest.skip(f"CUDA emulation needs {missing_packages()} (installed by .ci/run)", allow_module_level=True)


def emulated(stock: bool = False, as_cuda: bool = True):
    """Emulated kernels; CPU tensors count as CUDA for the Mamba-2 mixer when ``as_cuda``."""
    return emulated_cuda(
        device_hooks=((kernel_policy, "_device_type"),) if as_cuda else (),
        patches=(*ssd_patches(), *(stock_mamba2_patches() if stock else ())),
        import_caches=(kernel_policy._IMPORTS,),
    )


def lm(sizes=(16, 8), **overrides):
    """I = 32, G = 2: conv channels 32 + 4N (a multiple of 8 for even N); in_proj width 68 + 4N (never)."""
    return tiny_mamba2_lm(state_size=max(sizes), state_sizes=list(sizes), **overrides)


IDS = random_ids(batch=2, length=13)  # one full chunk of 8 and a partial one


def test_fused_training_forward_and_every_gradient_match_the_cpu_path():
    model = lm()
    ref_logits, ref_grads = run_train_step(model, IDS)
    with emulated() as calls:
        logits, grads = run_train_step(model, IDS)
    assert calls["mamba_split_conv1d_scan_combined"] == 2 and calls["mamba_chunk_scan_combined"] == 0
    assert calls["ssd_bwd"] == 2 and calls["layer_norm_bwd"] == 2 and calls["causal_conv1d_bwd"] == 2
    assert (logits - ref_logits).abs().max() < 1e-5
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5


def test_state_size_with_unaligned_conv_channels_trains_unfused_with_one_warning():
    """N = 7: 32 + 4·7 = 60 channels, which mamba_ssm's fused kernel asserts against (``ensure_stride``)."""
    model = lm((16, 7))
    ref_logits, ref_grads = run_train_step(model, IDS)
    with emulated() as calls, transformers_warnings() as logs:
        logits, grads = run_train_step(model, IDS)
        run_train_step(model, IDS)
    assert calls["mamba_split_conv1d_scan_combined"] == 2 and calls["mamba_chunk_scan_combined"] == 2
    assert calls["ssd_bwd"] == 4 and calls["causal_conv1d_bwd"] == 4
    assert sum("divisible by 8, got 60" in m for m in logs) == 1
    assert (logits - ref_logits).abs().max() < 1e-5
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5
    with emulated(), pytest.raises(AssertionError, match="multiple of 8"):  # what the fused kernel would do
        sys.modules["mamba_ssm.ops.triton.ssd_combined"].ensure_stride(torch.zeros(1, 4, 60))


def test_padded_training_batch_runs_unfused_and_matches():
    model = lm()
    with torch.no_grad():
        for mixer in find_mixers(model):
            mixer.conv1d.bias.normal_(0.0, 0.5)  # silu(bias) is what the fused kernel would leak past the mask
    mask = torch.ones_like(IDS)
    mask[0, :4] = 0
    ref_logits, ref_grads = run_train_step(model, IDS, mask)
    with emulated() as calls:
        logits, grads = run_train_step(model, IDS, mask)
    assert calls["mamba_split_conv1d_scan_combined"] == 0 and calls["mamba_chunk_scan_combined"] == 2
    assert (logits - ref_logits).abs().max() < 1e-5
    assert max_rel_grad_diff(grads, ref_grads) < 1e-5


def test_eval_forward_and_generate_with_cache_match_the_cpu_path():
    model = lm().eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        ref_logits = model(IDS).logits
        ref = model.generate(IDS, **kwargs)
    with emulated() as calls, torch.no_grad():
        logits = model(IDS).logits
        gen = model.generate(IDS, **kwargs)
    assert calls["mamba_split_conv1d_scan_combined"] == 0
    assert calls["mamba_chunk_scan_combined"] == 4 and calls["causal_conv1d_fwd"] == 4  # forward + prefill
    assert calls["causal_conv1d_update"] == 10 and calls["selective_state_update"] == 10  # 5 decode steps x 2
    assert (logits - ref_logits).abs().max() < 1e-5
    assert torch.equal(gen.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(gen.scores, ref.scores)) < 1e-5


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
    base = lm()
    cpu = _train_with_cuts(tmp_path / "cpu", copy.deepcopy(base))
    with emulated() as calls:
        emu = _train_with_cuts(tmp_path / "emu", copy.deepcopy(base))
    assert calls["mamba_split_conv1d_scan_combined"] > 0 and calls["ssd_bwd"] > 0
    assert emu.state_sizes() == cpu.state_sizes() and sum(cpu.state_sizes()) < 24
    kept = [[layer["kept"] for layer in h["layers"]] for h in emu.compression_history]
    assert kept == [[layer["kept"] for layer in h["layers"]] for h in cpu.compression_history]
    ref = dict(cpu.named_parameters())
    assert max((p - ref[n]).abs().max().item() for n, p in emu.named_parameters()) < 1e-4


def test_uniform_sizes_match_stock_mamba2_on_the_same_kernels_and_stock_eval_fails_the_conv_check():
    """Training: stock and ours run the same fused kernel, bit for bit. Evaluation: stock hands causal_conv1d a
    channel-last view whose stride (in_proj width 100) the kernel rejects; the mixer passes a contiguous copy."""
    model = lm((8, 8))
    stock = model.to_mamba2()
    with emulated(stock=True) as calls:
        logits, grads = run_train_step(model, IDS)
        # (stock >= 5.25 builds a cache in training unless told not to, which turns its fused kernel off)
        stock_logits, stock_grads = run_train_step(stock, IDS, use_cache=False)
        assert calls["mamba_split_conv1d_scan_combined"] == 4
        model.eval(), stock.eval()
        with torch.no_grad():
            model(IDS)
            with pytest.raises(KernelCheckError, match="multiples of 8"):
                stock(IDS)
    assert torch.equal(logits, stock_logits)
    assert max_rel_grad_diff(grads, stock_grads) == 0.0


def test_cpu_tensors_never_reach_the_kernels_and_get_no_install_advice():
    """Packages importable (emulated), tensors on CPU: the CPU code (the numba SSD scan when numba imports, else the
    torch code), no kernel call, no advice."""
    model = lm()
    with emulated(as_cuda=False) as calls, transformers_warnings() as logs:
        plan = find_mixers(model)[0].kernel_plan(torch.device("cpu"), torch.float32)
        run_train_step(model, IDS)
        model.eval()
        with torch.no_grad():
            model.generate(IDS, max_new_tokens=3, do_sample=False)
    cpu_scan = "numba" if importlib.util.find_spec("numba") is not None else "torch"
    assert (plan.scan, plan.conv, plan.fused, plan.step) == (cpu_scan, "torch", False, "torch")
    assert sum(calls.values()) == 0
    assert not [m for m in logs if "install" in m.lower()]
