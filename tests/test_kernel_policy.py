"""The one kernel policy (models/kernel_policy.py) as a table, and the mixer following it (decode included).

Installed packages are simulated through the policy's import cache, so every row runs on any machine.
"""

import types

import pytest
import torch
from helpers import random_ids, tiny_lm

from hf_compressssm.families import find_mixers
from hf_compressssm.models import kernel_policy as kp
from hf_compressssm.models import selective_scan as ss


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
_SCAN, _STEP = "mamba_ssm.ops.selective_scan_interface", "mamba_ssm.ops.triton.selective_state_update"

PACKAGES = {
    "all": {"numba": True, _SCAN: True, "causal_conv1d": True, _STEP: True},
    "none": {"numba": False, _SCAN: False, "causal_conv1d": False, _STEP: False, "mambapy.pscan": False},
    "no_conv": {"numba": True, _SCAN: "no_conv", "causal_conv1d": False, _STEP: True},
    "no_numba": {"numba": False, _SCAN: True, "causal_conv1d": True, _STEP: True},
}


@pytest.fixture
def packages(monkeypatch):
    """``packages(name)`` makes the policy see the package set ``PACKAGES[name]``; the env var starts unset."""
    monkeypatch.delenv(kp.ENV_VAR, raising=False)

    def use(name):
        for module, present in PACKAGES[name].items():
            if present is False:
                value = None
            else:
                value = types.SimpleNamespace(causal_conv1d_fwd_function=None if present == "no_conv" else object())
            monkeypatch.setitem(kp._IMPORTS, module, value)

    return use


# device, dtype, config scan_backend, env var, packages, training -> scan, conv, fused, step
TABLE = [
    ("cpu", F32, "auto", None, "all", True, ("numba", "torch", False, "torch")),
    ("cpu", F64, "auto", None, "all", True, ("numba", "torch", False, "torch")),
    ("cpu", BF16, "auto", None, "all", False, ("numba", "torch", False, "torch")),
    ("cpu", F32, "auto", None, "none", True, ("torch", "torch", False, "torch")),
    ("cpu", F32, "torch", None, "all", False, ("torch", "torch", False, "torch")),
    ("cpu", F32, "torch", "auto", "all", False, ("torch", "torch", False, "torch")),  # env 'auto' defers to config
    ("cpu", F32, "auto", "torch", "all", False, ("torch", "torch", False, "torch")),
    ("cpu", F32, "torch", "fast", "all", False, ("numba", "torch", False, "torch")),  # env beats config
    ("cpu", F32, "fast", None, "all", False, ("numba", "torch", False, "torch")),
    ("cuda", F32, "auto", None, "all", True, ("mamba_ssm", "causal_conv1d", True, "mamba_ssm")),
    ("cuda", F32, "auto", None, "all", False, ("mamba_ssm", "causal_conv1d", False, "mamba_ssm")),
    ("cuda", BF16, "auto", None, "no_numba", True, ("mamba_ssm", "causal_conv1d", True, "mamba_ssm")),
    ("cuda", F16, "mamba_ssm", None, "all", True, ("mamba_ssm", "causal_conv1d", True, "mamba_ssm")),
    ("cuda", F64, "auto", None, "all", True, ("torch", "torch", False, "torch")),
    ("cuda", F32, "torch", None, "all", True, ("torch", "torch", False, "torch")),
    ("cuda", F32, "mamba_ssm", "torch", "all", True, ("torch", "torch", False, "torch")),
    ("cuda", F32, "torch", "mamba_ssm", "all", True, ("mamba_ssm", "causal_conv1d", True, "mamba_ssm")),
    ("cuda", F32, "auto", "auto", "all", True, ("mamba_ssm", "causal_conv1d", True, "mamba_ssm")),
    ("cuda", F32, "auto", None, "no_conv", True, ("mamba_ssm", "torch", False, "mamba_ssm")),
    ("cuda", F32, "auto", None, "none", True, ("torch", "torch", False, "torch")),
    ("meta", F32, "auto", None, "all", True, ("torch", "torch", False, "torch")),
]


@pytest.mark.parametrize("device, dtype, config, env, pkgs, training, expected", TABLE)
def test_policy_table(packages, monkeypatch, device, dtype, config, env, pkgs, training, expected):
    packages(pkgs)
    if env is not None:
        monkeypatch.setenv(kp.ENV_VAR, env)
    plan = kp.plan_kernels(device, dtype, requested=config, d_state=16, conv_width=4, training=training)
    assert (plan.scan, plan.conv, plan.fused, plan.step) == expected
    assert plan.conv_step == plan.conv
    assert kp.resolve_scan_backend(device, config, dtype=dtype, d_state=16) == plan.scan
    if device == "cpu":
        assert plan.fallbacks == ()  # no CUDA advice on CPU


@pytest.mark.parametrize(
    "kwargs, expected, reason",
    [
        (dict(d_state=300), ("torch", "causal_conv1d", False), "state size 300 > 256"),
        (dict(conv_width=5), ("mamba_ssm", "torch", False), "conv_kernel=5"),
        (dict(conv_width=1), ("mamba_ssm", "torch", False), "conv_kernel=1"),
        (dict(activation="gelu"), ("mamba_ssm", "torch", False), "hidden_act='gelu'"),
        (dict(activation="swish"), ("mamba_ssm", "causal_conv1d", True), None),
        (dict(padded=True), ("mamba_ssm", "causal_conv1d", False), "padding"),
        (dict(plain_modules=False), ("mamba_ssm", "causal_conv1d", False), None),
        (dict(cached=True), ("mamba_ssm", "causal_conv1d", False), None),
        (dict(dtype=F64), ("torch", "torch", False), "float64"),
    ],
)
def test_kernel_limits_fall_back_under_auto(packages, kwargs, expected, reason):
    packages("all")
    args = dict(dtype=F32, d_state=16, conv_width=4, activation="silu", training=True)
    args.update(kwargs)
    plan = kp.plan_kernels("cuda", args.pop("dtype"), **args)
    assert (plan.scan, plan.conv, plan.fused) == expected
    if reason is None:
        assert plan.fallbacks == ()
    else:
        assert any(reason in r for r in plan.fallbacks), plan.fallbacks


@pytest.mark.parametrize(
    "device, dtype, requested, env, d_state, match",
    [
        ("cuda", F64, "mamba_ssm", None, 16, "forces mamba_ssm, but its kernel cannot take dtype torch.float64"),
        ("cuda", F32, "mamba_ssm", None, 300, "state size 300 > 256"),
        ("cuda", F32, "auto", "mamba_ssm", 300, "HF_COMPRESSSSM_SCAN_BACKEND='mamba_ssm'"),
        ("cpu", F32, "mamba_ssm", None, 16, "CUDA tensors only"),
        ("cuda", F32, "auto", "numba", 16, "CPU tensors only"),
    ],
)
def test_forced_backend_that_cannot_run_raises(packages, monkeypatch, device, dtype, requested, env, d_state, match):
    packages("all")
    if env:
        monkeypatch.setenv(kp.ENV_VAR, env)
    with pytest.raises(RuntimeError, match=match):
        kp.plan_kernels(device, dtype, requested=requested, d_state=d_state)


def test_forced_but_not_installed_and_unknown_names(packages):
    packages("none")
    with pytest.raises(RuntimeError, match="not importable"):
        kp.plan_kernels("cuda", F32, requested="mamba_ssm")
    with pytest.raises(RuntimeError, match="numba is not installed"):
        kp.plan_kernels("cpu", F32, requested="fast")
    with pytest.raises(RuntimeError, match="mambapy"):
        kp.plan_kernels("cpu", F32, requested="mambapy")
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        kp.plan_kernels("cpu", F32, requested="cuda_kernels")
    plan = kp.plan_kernels("cuda", F32)
    assert plan.scan == "torch" and any("hf-compressssm[cuda]" in r for r in plan.fallbacks)


# ------------------------------------------------------------------------------------------ the mixer follows it


def test_decode_follows_the_config_even_with_env_auto(monkeypatch):
    """``HF_COMPRESSSSM_SCAN_BACKEND=auto`` + ``scan_backend='torch'``: prefill and decode both run torch."""
    monkeypatch.setenv(kp.ENV_VAR, "auto")
    model = tiny_lm(scan_backend="torch").eval()
    seen = []
    real = ss.resolve_scan_backend
    monkeypatch.setattr(ss, "resolve_scan_backend", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    monkeypatch.setattr(ss, "_scan_numba", lambda *a, **k: pytest.fail("numba scan used despite scan_backend='torch'"))
    with torch.no_grad():
        model.generate(random_ids(batch=1, length=6), max_new_tokens=3, do_sample=False)
    assert seen and set(seen) == {"torch"}
    assert {m.kernel_plan(torch.device("cpu"), F32).scan for m in find_mixers(model)} == {"torch"}


def test_cpu_model_uses_no_transformers_kernel_wrappers(monkeypatch):
    """transformers binds its conv/scan names to causal_conv1d/mamba_ssm at import; the mixer never calls them."""
    import transformers.models.mamba.modeling_mamba as mm

    for name in ("causal_conv1d_fn", "causal_conv1d_update", "mamba_inner_fn", "mamba_selective_scan"):
        monkeypatch.setattr(mm, name, lambda *a, _n=name, **k: pytest.fail(f"called transformers' {_n}"))
    model = tiny_lm()
    ids = random_ids(batch=2, length=8)
    model.train()
    model(ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
