"""The selective scan (hf_compressssm/selective_scan.py) against an independent sequential loop in float64.

The numba kernels compile once per dtype (float32, float64) on first use and are cached on disk; keep the number
of distinct dtypes small here. Sizes are small (D <= 32, L <= 64, N <= 16) so the reference Python loop is quick.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_compressssm.models import selective_scan as ss


numba_available = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not numba_available, reason="numba not installed")

FAST = "numba"
SCAN_MODULE = Path(ss.__file__)


def ref_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """The sequential loop of `exact_scan` run in float64 (differentiable), cast back to the inputs' dtype."""
    f64 = [t.double() if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
    y, h = exact_scan(*f64[:5], D=f64[5], z=f64[6], delta_bias=f64[7], delta_softplus=delta_softplus)
    y, h = y.to(u.dtype), h.to(u.dtype)
    return (y, h) if return_last_state else y


def ref_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the recurrence in float64, written out; updates ``state`` (b, D, N) in place."""
    dt = dt.double() + (dt_bias.double() if dt_bias is not None else 0.0)
    dt = F.softplus(dt) if dt_softplus else dt
    h = torch.exp(dt[..., None] * A.double()) * state.double() + (dt * x.double())[..., None] * B.double()[:, None]
    state.copy_(h.to(state.dtype))
    y = (h * C.double()[:, None]).sum(-1)
    if D is not None:
        y = y + x.double() * D.double()
    if z is not None:
        y = y * F.silu(z.double())
    return y.to(x.dtype)


def exact_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """An independent, plain loop in the inputs' dtype (no float32 casts), for float64 checks."""
    dt = delta + delta_bias[:, None] if delta_bias is not None else delta
    dt = F.softplus(dt) if delta_softplus else dt
    bsz, dim, seqlen = u.shape
    h = initial_state if initial_state is not None else u.new_zeros(bsz, dim, A.shape[1])
    ys = []
    for t in range(seqlen):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h


NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(bsz, dim, seqlen, n, dtype, *, D=True, z=True, bias=True, seed=0, transposed_bc=False, softplus=True):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    u = rnd(bsz, dim, seqlen)
    delta = rnd(bsz, dim, seqlen, scale=0.5, shift=-1.0)
    if not softplus:  # used as the step size directly: keep it positive so the recurrence stays stable
        delta = delta.abs() * 0.5
    A = -torch.exp(rnd(dim, n, scale=0.5))
    if transposed_bc:  # the layout the Mamba mixer passes: (batch, L, N) tensors transposed to (batch, N, L)
        B = rnd(bsz, seqlen, n).transpose(1, 2)
        C = rnd(bsz, seqlen, n).transpose(1, 2)
    else:
        B = rnd(bsz, n, seqlen)
        C = rnd(bsz, n, seqlen)
    out = dict(
        u=u,
        delta=delta,
        A=A,
        B=B,
        C=C,
        D=rnd(dim) if D else None,
        z=rnd(bsz, dim, seqlen) if z else None,
        delta_bias=rnd(dim, scale=0.3) if bias else None,
    )
    return {k: (v.detach().requires_grad_() if v is not None else None) for k, v in out.items()}


def grads_of(fn, inputs, weights, extra=()):
    """Value and gradients of sum(w * out) for fn(**inputs) (out is y, or (y, last_state))."""
    out = fn(**inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    leaves = [(k, v) for k, v in list(inputs.items()) + list(extra) if isinstance(v, torch.Tensor) and v.requires_grad]
    gs = torch.autograd.grad(loss, [v for _, v in leaves])
    return [o.detach() for o in outs], dict(zip([k for k, _ in leaves], gs))


def assert_close(ours, ref, rtol, what):
    """|ours - ref| <= rtol * max|ref| (+ a floor for all-zero references)."""
    assert torch.isfinite(ref).all(), f"{what}: non-finite reference"
    scale = ref.abs().max().item()
    err = (ours.to(ref.dtype) - ref).abs().max().item()
    assert err <= rtol * max(scale, 1e-30) + 1e-30, f"{what}: max err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def check_against(fn_ours, fn_ref, inputs, rtol, return_last_state, skip_grads=()):
    g = torch.Generator().manual_seed(123)
    bsz, dim, seqlen = inputs["u"].shape
    n = inputs["A"].shape[1]
    dtype = inputs["u"].dtype
    weights = [torch.randn(bsz, dim, seqlen, generator=g, dtype=torch.float64).to(dtype)]
    if return_last_state:
        weights.append(torch.randn(bsz, dim, n, generator=g, dtype=torch.float64).to(dtype))
    outs, grads = grads_of(fn_ours, inputs, weights)
    routs, rgrads = grads_of(fn_ref, inputs, weights)
    assert outs[0].shape == (bsz, dim, seqlen) and outs[0].dtype == dtype
    assert_close(outs[0], routs[0], rtol, "y")
    if return_last_state:
        assert outs[1].shape == (bsz, dim, n)
        assert_close(outs[1], routs[1], rtol, "last_state")
    assert set(grads) == set(rgrads)
    for k in grads:
        if k not in skip_grads:
            assert grads[k].shape == inputs[k].shape and grads[k].dtype == inputs[k].dtype, k
            assert_close(grads[k], rgrads[k], rtol, f"d{k}")
    return grads, rgrads


FLOAT32_CASES = [
    # batch, D, L, N, flags
    (2, 16, 33, 16, dict()),
    (1, 8, 1, 4, dict()),  # L = 1, batch 1
    (3, 32, 64, 8, dict(transposed_bc=True)),
    (2, 24, 17, 1, dict(D=False, z=False, bias=False, softplus=False)),
    (1, 5, 7, 3, dict(z=False)),
    (2, 7, 64, 13, dict(D=False, softplus=False)),
]


@needs_numba
@pytest.mark.parametrize("bsz,dim,seqlen,n,flags", FLOAT32_CASES)
def test_float32_matches_transformers_reference(bsz, dim, seqlen, n, flags):
    softplus = flags.get("softplus", True)
    inputs = make_inputs(bsz, dim, seqlen, n, torch.float32, **flags)
    for last in (False, True):
        check_against(
            lambda **kw: ss.selective_scan(**kw, delta_softplus=softplus, return_last_state=last, backend=FAST),
            lambda **kw: ref_scan(**kw, delta_softplus=softplus, return_last_state=last),
            inputs,
            1e-4,
            last,
        )


@pytest.mark.compat
@needs_numba
@pytest.mark.parametrize("bsz,dim,seqlen,n", [(2, 16, 33, 16), (1, 3, 1, 2), (2, 32, 64, 5)])
def test_float64_tight(bsz, dim, seqlen, n):
    inputs = make_inputs(bsz, dim, seqlen, n, torch.float64)
    ours = lambda **kw: ss.selective_scan(**kw, delta_softplus=True, return_last_state=True, backend=FAST)  # noqa: E731
    # an independent exact float64 loop: every output and gradient to 1e-10
    check_against(ours, lambda **kw: exact_scan(**kw, delta_softplus=True), inputs, 1e-10, True)
    # transformers' reference casts u and B to float32 internally (`.float()`), so with float32-representable
    # inputs its forward and most gradients are exact in float64, but du and dB are rounded through float32
    inputs32 = {k: (v.detach().float().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    grads, rgrads = check_against(
        ours,
        lambda **kw: ref_scan(**kw, delta_softplus=True, return_last_state=True),
        inputs32,
        1e-10,
        True,
        skip_grads=("u", "B"),
    )
    for k in ("u", "B"):
        assert_close(grads[k], rgrads[k], 1e-6, f"d{k} (reference rounded to float32)")


@pytest.mark.compat
@needs_numba
def test_gradcheck_float64_with_initial_and_last_state():
    inputs = make_inputs(1, 3, 4, 2, torch.float64, seed=3)
    h0 = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    keys = [k for k in NAMES if inputs[k] is not None]

    def f(*args):
        kw = dict(zip(keys, args))
        y, last = ss.selective_scan(
            **kw, delta_softplus=True, return_last_state=True, initial_state=args[-1], backend=FAST
        )
        return y, last

    assert torch.autograd.gradcheck(f, [inputs[k] for k in keys] + [h0], eps=1e-6, atol=1e-7, rtol=1e-6)


@needs_numba
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_initial_state_equals_scanning_the_concatenated_sequence(dtype, rtol):
    """Two chunks (the second started from the first's last state) == one scan of the whole sequence, in the
    outputs, final state and every gradient (which flows through initial_state and the last state)."""
    inputs = make_inputs(2, 12, 23, 6, dtype, seed=5)
    split = 9

    def chunked(u, delta, A, B, C, D, z, delta_bias):
        kw = dict(A=A, D=D, delta_bias=delta_bias, delta_softplus=True, return_last_state=True, backend=FAST)
        y1, h1 = ss.selective_scan(
            u[..., :split], delta[..., :split], B=B[..., :split], C=C[..., :split], z=z[..., :split], **kw
        )
        y2, h2 = ss.selective_scan(
            u[..., split:],
            delta[..., split:],
            B=B[..., split:],
            C=C[..., split:],
            z=z[..., split:],
            initial_state=h1,
            **kw,
        )
        return torch.cat([y1, y2], -1), h2

    ref = (
        (lambda **kw: exact_scan(**kw, delta_softplus=True))
        if dtype == torch.float64
        else (lambda **kw: ref_scan(**kw, delta_softplus=True, return_last_state=True))
    )
    check_against(chunked, ref, inputs, rtol, True)


@needs_numba
def test_initial_state_gradient_matches_torch_backend():
    inputs = make_inputs(2, 10, 15, 4, torch.float64, seed=9)
    h0 = torch.randn(2, 10, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 10, 15, dtype=torch.float64), torch.randn(2, 10, 4, dtype=torch.float64)
    res = {}
    for backend in (FAST, "torch"):
        y, h = ss.selective_scan(
            **inputs, delta_softplus=True, return_last_state=True, initial_state=h0, backend=backend
        )
        loss = (y * w[0]).sum() + (h * w[1]).sum()
        res[backend] = [y, h] + list(torch.autograd.grad(loss, [h0] + [v for v in inputs.values() if v is not None]))
    for a, b in zip(res[FAST], res["torch"]):
        assert_close(a.detach(), b.detach(), 1e-10, "torch backend")


@needs_numba
def test_several_channel_blocks_in_one_work_item():
    """D = 80 spans a full and a partial 64-lane block; with one thread and 4 batch rows each work item holds both
    blocks, so the partial block must not see the previous block's values in its padding lanes."""
    inputs = make_inputs(4, 80, 9, 3, torch.float64, seed=11)
    h0 = torch.randn(4, 80, 3, dtype=torch.float64, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_against(
            lambda **kw: ss.selective_scan(
                **kw, delta_softplus=True, return_last_state=True, initial_state=h0, backend=FAST
            ),
            lambda **kw: exact_scan(**kw, delta_softplus=True, initial_state=h0),
            dict(inputs),
            1e-10,
            True,
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["torch"] + (["mambapy"] if importlib.util.find_spec("mambapy") else []))
def test_other_backends_match_reference(backend):
    inputs = make_inputs(2, 8, 19, 4, torch.float32, seed=2)
    check_against(
        lambda **kw: ss.selective_scan(**kw, delta_softplus=True, return_last_state=True, backend=backend),
        lambda **kw: ref_scan(**kw, delta_softplus=True, return_last_state=True),
        inputs,
        1e-4,
        True,
    )


def test_torch_backend_chunking_and_initial_state():
    inputs = make_inputs(1, 6, 21, 3, torch.float64, seed=4)
    h0 = torch.randn(1, 6, 3, dtype=torch.float64)
    args = [inputs[k] for k in NAMES]
    y1, h1 = ss._scan_torch(*args, True, h0, chunk=4)
    y2, h2 = exact_scan(*args, delta_softplus=True, initial_state=h0)
    assert_close(y1.detach(), y2.detach(), 1e-12, "y")
    assert_close(h1.detach(), h2.detach(), 1e-12, "h")


@needs_numba
@pytest.mark.parametrize("dtype,rtol,ref_rtol", [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-12, 1e-6)])
def test_decode_step_matches_reference_and_the_scan(dtype, rtol, ref_rtol):
    bsz, dim, n, steps = 2, 12, 5, 6
    inputs = {k: (v.detach() if v is not None else None) for k, v in make_inputs(bsz, dim, steps, n, dtype).items()}
    state0 = torch.randn(bsz, dim, n, dtype=dtype)
    state, rstate = state0.clone(), state0.clone()
    ys = []
    for t in range(steps):
        step = dict(
            x=inputs["u"][..., t],
            dt=inputs["delta"][..., t],
            A=inputs["A"],
            B=inputs["B"][..., t],
            C=inputs["C"][..., t],
            D=inputs["D"],
            z=inputs["z"][..., t],
            dt_bias=inputs["delta_bias"],
            dt_softplus=True,
        )
        y = ss.selective_state_update(state, **step)
        ry = ref_step(
            rstate,
            step["x"],
            step["dt"],
            step["A"],
            step["B"],
            step["C"],
            D=step["D"],
            z=step["z"],
            dt_bias=step["dt_bias"],
            dt_softplus=True,
        )
        assert y.shape == (bsz, dim) and y.dtype == dtype
        assert_close(y, ry, ref_rtol, f"y step {t}")
        assert_close(state, rstate, ref_rtol, f"state step {t}")
        ys.append(y)
    # the same tokens through the scan, started from the same state
    y_scan, h_scan = ss.selective_scan(
        **inputs, delta_softplus=True, return_last_state=True, initial_state=state0, backend=FAST
    )
    assert_close(torch.stack(ys, -1), y_scan, 10 * rtol, "decode vs scan")
    assert_close(state, h_scan, 10 * rtol, "decode state vs scan state")


# ---------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    return monkeypatch


def test_auto_dispatch_follows_the_device(no_env):
    assert ss.resolve_scan_backend("cpu") == ("numba" if numba_available else "torch")
    assert ss.resolve_scan_backend(torch.zeros(1)) == ss.resolve_scan_backend("cpu")
    cuda = ss.resolve_scan_backend("cuda")
    assert cuda == ("mamba_ssm" if ss._mamba_ssm_importable() else "torch")
    assert ss.resolve_scan_backend("meta", "auto") == "torch"
    assert ss.resolve_scan_backend("cpu", "torch") == "torch"
    assert "torch" in ss.available_backends() and "torch" in ss.available_backends("cpu")
    assert ("numba" in ss.available_backends("cpu")) == numba_available
    assert "numba" not in ss.available_backends("cuda")


@needs_numba
def test_forced_backends_and_env_var(no_env):
    assert ss.resolve_scan_backend("cpu", "fast") == "numba"
    assert ss.resolve_scan_backend("cpu", " NUMBA ") == "numba"
    no_env.setenv(ss.ENV_VAR, "torch")
    assert ss.resolve_scan_backend("cpu") == "torch"
    assert ss.resolve_scan_backend("cpu", "fast") == "torch"  # the environment overrides the argument/config
    no_env.setenv(ss.ENV_VAR, "fast")
    assert ss.resolve_scan_backend("cpu", "torch") == "numba"
    no_env.setenv(ss.ENV_VAR, "auto")
    assert ss.resolve_scan_backend("cpu", "torch") == "torch"
    no_env.setenv(ss.ENV_VAR, "")
    assert ss.resolve_scan_backend("cpu", "torch") == "torch"


def test_impossible_forced_backend_raises(no_env):
    with pytest.raises(RuntimeError, match="CUDA"):
        ss.resolve_scan_backend("cpu", "mamba_ssm")
    with pytest.raises(RuntimeError, match="CPU"):
        ss.resolve_scan_backend("cuda", "numba")
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        ss.resolve_scan_backend("cpu", "cuda_kernels")
    no_env.setenv(ss.ENV_VAR, "mamba_ssm")
    with pytest.raises(RuntimeError, match=ss.ENV_VAR):
        ss.resolve_scan_backend("cpu")
    inputs = make_inputs(1, 4, 3, 2, torch.float32)
    with pytest.raises(RuntimeError):
        ss.selective_scan(**inputs)
    # numba missing: forcing it is an error, auto falls back to torch
    no_env.delenv(ss.ENV_VAR)
    no_env.setitem(ss._IMPORTS, "numba", None)
    with pytest.raises(RuntimeError, match="numba is not installed"):
        ss.resolve_scan_backend("cpu", "fast")
    assert ss.resolve_scan_backend("cpu") == "torch"
    no_env.setitem(ss._IMPORTS, "mambapy.pscan", None)
    with pytest.raises(RuntimeError, match="mambapy"):
        ss.resolve_scan_backend("cpu", "mambapy")


@needs_numba
def test_env_var_switches_the_scan_at_call_time(no_env):
    inputs = make_inputs(1, 4, 5, 2, torch.float32)
    calls = []
    real = ss._scan_torch
    no_env.setattr(ss, "_scan_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    y_fast = ss.selective_scan(**inputs)
    assert calls == []
    no_env.setenv(ss.ENV_VAR, "torch")
    y_torch = ss.selective_scan(**inputs)
    assert calls == [1]
    assert_close(y_fast.detach(), y_torch.detach(), 1e-5, "fast vs torch")


def test_shape_errors():
    inputs = make_inputs(1, 4, 3, 2, torch.float32)
    bad = dict(inputs, B=inputs["B"][:, :, :2])
    with pytest.raises(ValueError, match="B must be"):
        ss.selective_scan(**bad, backend="torch")


def test_module_is_importable_on_its_own(tmp_path):
    """Copied next to weights as remote code: only torch/numpy/stdlib at import, numba not imported eagerly."""
    target = tmp_path / "selective_scan.py"
    target.write_text(SCAN_MODULE.read_text())
    policy = SCAN_MODULE.parent / "kernel_policy.py"  # its one sibling, copied with it as remote code
    (tmp_path / "kernel_policy.py").write_text(policy.read_text())
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('standalone_scan', {str(target)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert not {'numba', 'transformers', 'hf_compressssm'} & set(sys.modules)\n"
        "import torch\n"
        "u = torch.randn(1, 3, 4); A = -torch.rand(3, 2) - 0.1; B = torch.randn(1, 2, 4)\n"
        "y = m.selective_scan(u, u.clone(), A, B, B.clone(), backend='torch')\n"
        "assert y.shape == (1, 3, 4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop(ss.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for src in (SCAN_MODULE.read_text(), policy.read_text()):
        assert "import hf_compressssm" not in src and "from hf_compressssm" not in src
        assert src.count("from .") == src.count("from . import kernel_policy")
