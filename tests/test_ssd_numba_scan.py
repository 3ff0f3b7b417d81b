"""The numba SSD scan (models/ssd_numba_scan.py) against a sequential float64 loop, the torch chunk path and stock.

Outputs and every gradient (x, dt, dt_bias, A, B, C, D, initial state), float32 and float64, N = 1 / odd / larger,
several groups, padded positions, several backward checkpoint segments and head splits; decode = scan; the kernel
choice on CPU and the torch fallback without numba; the Mamba-2 model with the kernel against the torch path and
stock ``Mamba2ForCausalLM``. Sizes are tiny so the reference loop is quick; the kernels compile once per dtype.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import cached_decode_logits, random_ids
from mamba2_helpers import stock_mamba2_lm, tiny_mamba2_lm

from hf_compressssm import CompreSSMMamba2ForCausalLM
from hf_compressssm.models import kernel_policy as kp
from hf_compressssm.models import ssd_numba_scan as sn
from hf_compressssm.models.ssd_scan import ssd_chunk_scan, ssd_state_update


pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")

F64 = torch.float64
NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


def sequential_scan(x, dt, A, B, C, D=None, dt_bias=None, initial_states=None, dt_limit=(0.0, float("inf"))):
    """The recurrence step by step, in the inputs' dtype (differentiable): y (b, L, H, P), final state (b, H, P, N)."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    step = F.softplus(dt + (dt_bias if dt_bias is not None else 0.0)).clamp(*dt_limit)
    s = initial_states if initial_states is not None else x.new_zeros(batch, heads, head_dim, B.shape[3])
    ys = []
    for t in range(length):
        b_t = B[:, t].repeat_interleave(per_group, 1)[:, :, None, :]  # (b, H, 1, N)
        c_t = C[:, t].repeat_interleave(per_group, 1)[:, :, None, :]
        s = torch.exp(step[:, t] * A)[..., None, None] * s + (step[:, t, :, None] * x[:, t])[..., None] * b_t
        y = (s * c_t).sum(-1)
        ys.append(y + D[:, None] * x[:, t] if D is not None else y)
    return torch.stack(ys, 1), s


def make_inputs(batch, length, heads, head_dim, groups, n, dtype, seed=0, pad=0, h0=True, D=True):
    """Leaf tensors of a scan; the first ``pad`` positions of row 0 are padding (x, B, C zero, as the mixer does)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(dtype)

    inputs = dict(
        x=rand(batch, length, heads, head_dim),
        dt=rand(batch, length, heads, scale=0.5, shift=-1.0),
        A=-torch.rand(heads, generator=g, dtype=F64).add(0.5).mul(torch.arange(1, heads + 1)).to(dtype),
        B=rand(batch, length, groups, n),
        C=rand(batch, length, groups, n),
        D=rand(heads) if D else None,
        dt_bias=rand(heads, scale=0.3),
        initial_states=rand(batch, heads, head_dim, n) if h0 else None,
    )
    for key in ("x", "B", "C"):
        inputs[key][0, :pad] = 0
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run(fn, inputs, **kwargs):
    """(y, final state) of ``fn`` with the mixer's arguments."""
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    return fn(
        *args,
        chunk_size=4,
        D=inputs["D"],
        dt_bias=inputs["dt_bias"],
        initial_states=inputs["initial_states"],
        dt_softplus=True,
        return_final_states=True,
        **kwargs,
    )


def outputs_and_grads(fn, inputs, seed=1, **kwargs):
    y, final = run(fn, inputs, **kwargs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=F64).to(y.dtype)
    gf = torch.randn(final.shape, generator=g, dtype=F64).to(final.dtype)
    leaves = [inputs[k] for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), leaves)
    return {"y": y, "final": final, **dict(zip([k for k in NAMES if inputs[k] is not None], grads))}


def reference(inputs, **kwargs):
    """`sequential_scan` in float64 on float64 copies of ``inputs``."""
    copies = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    return outputs_and_grads(
        lambda *a, chunk_size, dt_softplus, return_final_states, **k: sequential_scan(*a, **k), copies, **kwargs
    )


def assert_all_close(got, want, rtol, atol, what):
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().clamp(min=1.0)
        err = (got[key].double() - want[key].double()).abs().max()
        assert err <= atol * scale + rtol * want[key].abs().max(), f"{what}: {key} off by {err:.3g} (scale {scale:.3g})"


SHAPES = [  # batch, length, heads, head_dim, groups, N
    (2, 11, 4, 3, 2, 1),  # N = 1
    (1, 9, 3, 5, 1, 5),  # odd N, odd head_dim, one group
    (2, 13, 6, 4, 3, 7),  # three groups of two heads
    (2, 20, 4, 8, 2, 16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-L{}-H{}-P{}-G{}-N{}".format(*s))
def test_float64_matches_the_sequential_reference_exactly(shape):
    inputs = make_inputs(*shape, F64, pad=3)
    assert_all_close(outputs_and_grads(sn.ssd_numba_scan, inputs), reference(inputs), 1e-11, 1e-12, "float64")


@pytest.mark.parametrize("options", [dict(h0=False), dict(D=False), dict(h0=False, D=False)], ids=str)
def test_optional_inputs(options):
    inputs = make_inputs(2, 10, 4, 3, 2, 5, F64, **options)
    assert_all_close(outputs_and_grads(sn.ssd_numba_scan, inputs), reference(inputs), 1e-11, 1e-12, str(options))


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("A_values", [(-0.05, -3.0, -60.0, -1e4), (0.4, 2.5, -0.5, -8.0)], ids=["decaying", "growing"])
def test_decay_products_leave_their_range(A_values, dtype):
    """The kernels keep the running decay product out of the state while it stays within 2^-20 .. 2^20 and fold it
    in otherwise: slow, fast, underflowing (exp(Δ A) = 0) and growing (A > 0) heads over 40 steps, several
    checkpoint segments (N = 4, so K = 4 .. 40)."""
    inputs = make_inputs(2, 40, 4, 3, 2, 4, dtype, pad=3)
    with torch.no_grad():
        inputs["A"].copy_(torch.tensor(A_values, dtype=dtype))
    tol = (1e-11, 1e-12) if dtype == F64 else (1e-4, 1e-5)
    assert_all_close(outputs_and_grads(sn.ssd_numba_scan, inputs), reference(inputs), *tol, f"A = {A_values}")


def test_forward_without_gradients_keeps_no_checkpoints_and_gives_the_same_outputs():
    inputs = make_inputs(2, 30, 4, 3, 2, 5, torch.float32)
    y, final = run(sn.ssd_numba_scan, inputs)
    with torch.no_grad():
        y_ng, final_ng = run(sn.ssd_numba_scan, inputs)
    assert torch.equal(y.detach(), y_ng) and torch.equal(final.detach(), final_ng)
    assert y.grad_fn is not None and y_ng.grad_fn is None


def test_dt_limit():
    inputs = make_inputs(2, 10, 4, 3, 2, 5, F64)
    limit = (0.2, 0.6)  # clamps some steps on both sides: those get no dt gradient
    ours = outputs_and_grads(sn.ssd_numba_scan, inputs, dt_limit=limit)
    assert_all_close(ours, reference(inputs, dt_limit=limit), 1e-11, 1e-12, "dt_limit")


def test_output_only_gradient():
    """No gradient flows into the final state (the training forward): the backward gets dfinal = None."""
    inputs = make_inputs(2, 10, 4, 3, 2, 5, F64)
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    y = sn.ssd_numba_scan(*args, D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)
    y_ref, _ = sequential_scan(*args, D=inputs["D"], dt_bias=inputs["dt_bias"])
    leaves = args + [inputs["D"], inputs["dt_bias"]]
    for got, want in zip(
        torch.autograd.grad(y.square().sum(), leaves), torch.autograd.grad(y_ref.square().sum(), leaves)
    ):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-11)


def test_gradcheck_float64_with_several_segments_and_head_splits(monkeypatch):
    """Tiny sizes; 4-step checkpoint segments and two threads (the backward splits each group's heads)."""
    monkeypatch.setattr(sn, "SEGMENT_BYTES", 8)  # K = 4, the least: three segments of 11 steps
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert sn._head_splits(1, 1, 4, 2) > 1
        assert sn._segment_length(11, 2, 3, 8) == 4
        inputs = make_inputs(1, 11, 4, 3, 1, 2, F64, pad=2)
        leaves = [inputs[k] for k in NAMES]

        def fn(*args):
            y, final = sn.ssd_numba_scan(
                *args[:5],
                D=args[5],
                dt_bias=args[6],
                initial_states=args[7],
                dt_softplus=True,
                return_final_states=True,
            )
            return y, final

        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)
        assert_all_close(outputs_and_grads(sn.ssd_numba_scan, inputs), reference(inputs), 1e-11, 1e-12, "split")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES[2:], ids=lambda s: "b{}-L{}-H{}-P{}-G{}-N{}".format(*s))
def test_float32_against_the_reference_and_the_torch_chunk_path(shape):
    inputs = make_inputs(*shape, torch.float32, pad=2)
    ours = outputs_and_grads(sn.ssd_numba_scan, inputs)
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert_all_close(ours, reference(inputs), 1e-5, 1e-5, "float32 vs float64 reference")
    assert_all_close(ours, outputs_and_grads(ssd_chunk_scan, inputs), 1e-4, 1e-4, "float32 vs torch chunks")


def test_empty_sequence_and_bad_arguments():
    inputs = make_inputs(2, 0, 4, 3, 2, 5, torch.float32)
    y, final = run(sn.ssd_numba_scan, inputs)
    assert y.shape == (2, 0, 4, 3) and torch.equal(final, inputs["initial_states"].detach())
    with pytest.raises(ValueError, match="gating"):
        run(sn.ssd_numba_scan, inputs, z=inputs["x"])
    bad = dict(inputs, B=inputs["B"][:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="G dividing"):
        run(sn.ssd_numba_scan, bad)
    with pytest.raises(RuntimeError, match="CPU"):
        run(sn.ssd_numba_scan, {k: (v.to("meta") if v is not None else None) for k, v in inputs.items()})


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_decode_steps_and_chunked_prefill_equal_the_scan(dtype):
    inputs = {k: v.detach() for k, v in make_inputs(2, 12, 4, 3, 2, 5, dtype).items()}
    y, final = run(sn.ssd_numba_scan, inputs)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    # prefill 7 tokens, continue with the rest from the returned state
    head, tail = (
        {k: v[:, s] if k in ("x", "dt", "B", "C") else v for k, v in inputs.items()}
        for s in (slice(0, 7), slice(7, None))
    )
    y1, state = run(sn.ssd_numba_scan, head)
    y2, final2 = run(sn.ssd_numba_scan, dict(tail, initial_states=state))
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, **tol)
    torch.testing.assert_close(final2, final, **tol)
    # decode steps (mamba_ssm's selective_state_update layout, as the mixer calls it)
    head_dim, n = 3, 5
    state = inputs["initial_states"].clone()
    for t in range(12):
        step = ssd_state_update(
            state,
            inputs["x"][:, t],
            inputs["dt"][:, t, :, None].expand(-1, -1, head_dim),
            inputs["A"][:, None, None].expand(-1, head_dim, n),
            inputs["B"][:, t],
            inputs["C"][:, t],
            inputs["D"][:, None].expand(-1, head_dim),
            dt_bias=inputs["dt_bias"][:, None].expand(-1, head_dim),
            dt_softplus=True,
        )
        torch.testing.assert_close(step, y[:, t].to(step.dtype), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final.to(state.dtype), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the choice


@pytest.fixture
def plan(monkeypatch):
    monkeypatch.delenv(kp.ENV_VAR, raising=False)

    def make(device="cpu", dtype=torch.float32):
        return kp.plan_mamba2_kernels(
            device,
            dtype,
            conv_width=4,
            activation="silu",
            training=True,
            cached=False,
            plain_modules=True,
            padded=False,
            conv_dim=64,
            state_size=8,
        )

    return make


def test_cpu_picks_the_numba_scan_unless_told_or_missing(plan, monkeypatch):
    assert (plan().scan, plan().step, plan().fused) == ("numba", "torch", False)
    assert plan(dtype=F64).scan == "numba" and plan("meta").scan == "torch"
    monkeypatch.setenv(kp.ENV_VAR, "torch")
    assert plan().scan == "torch"
    monkeypatch.setenv(kp.ENV_VAR, "fast")
    assert plan().scan == "numba"
    monkeypatch.setitem(kp._IMPORTS, "numba", None)  # numba missing
    with pytest.raises(RuntimeError, match="numba is not installed"):
        plan()
    monkeypatch.setenv(kp.ENV_VAR, "auto")
    assert plan().scan == "torch" and plan().fallbacks == ()


def test_the_mixer_calls_the_kernel_on_cpu(monkeypatch):
    monkeypatch.delenv(kp.ENV_VAR, raising=False)
    from hf_compressssm.models import modeling_compressssm_mamba2 as mm

    calls = []
    real = mm.ssd_numba_scan
    monkeypatch.setattr(mm, "ssd_numba_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(mm, "ssd_chunk_scan", lambda *a, **k: pytest.fail("torch chunk scan used on CPU"))
    model = tiny_mamba2_lm(state_sizes=[5, 1])
    ids = random_ids(length=10)
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2


def test_torch_fallback_without_numba(tmp_path):
    """A process where ``import numba`` fails: the plan says torch and the model trains with the torch code."""
    model = tiny_mamba2_lm(state_sizes=[5, 1])
    ids = random_ids(length=10)
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"state": model.state_dict(), "ids": ids, "logits": expected}, tmp_path / "data.pt")
    script = f"""
import sys
sys.modules['numba'] = None  # import numba -> ImportError
import torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from mamba2_helpers import tiny_mamba2_lm
from hf_compressssm.models import modeling_compressssm_mamba2 as mm
mm.ssd_numba_scan = None  # must not be called
data = torch.load({str(tmp_path / "data.pt")!r})
model = tiny_mamba2_lm(state_sizes=[5, 1])
model.load_state_dict(data['state'])
assert model.backbone.layers[0].mixer.kernel_plan(torch.device('cpu')).scan == 'torch'
logits = model(data['ids']).logits
torch.testing.assert_close(logits.detach(), data['logits'], atol=1e-5, rtol=1e-5)
logits.sum().backward()
assert sys.modules.get('numba') is None
print('FALLBACK_OK')
"""
    env = {k: v for k, v in os.environ.items() if k != kp.ENV_VAR}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FALLBACK_OK" in result.stdout


# ---------------------------------------------------------------------------------------------- the model


def _train_step(model, ids, mask=None):
    model.zero_grad(set_to_none=True)
    model.train()
    out = model(ids, labels=ids, attention_mask=mask, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "left-padded"])
def test_model_logits_and_grads_match_the_torch_path_and_stock(monkeypatch, padded):
    monkeypatch.delenv(kp.ENV_VAR, raising=False)
    stock = stock_mamba2_lm(seed=3, state_size=5)  # odd N, two groups, several chunks of 8
    ours = CompreSSMMamba2ForCausalLM.from_mamba2(stock)
    ids = random_ids(length=19)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        ids[0, :4], mask[0, :4] = 0, 0
    assert ours.backbone.layers[0].mixer.kernel_plan(ids.device).scan == "numba"
    numba_out = _train_step(ours, ids, mask)
    stock_out = _train_step(stock, ids, mask)
    monkeypatch.setenv(kp.ENV_VAR, "torch")
    torch_out = _train_step(ours, ids, mask)
    for other, what in ((torch_out, "torch path"), (stock_out, "stock")):
        torch.testing.assert_close(numba_out[0], other[0], atol=1e-5, rtol=1e-5, msg=what)
        for name, grad in other[1].items():
            torch.testing.assert_close(numba_out[1][name], grad, atol=1e-5, rtol=1e-4, msg=f"{what}: {name}")


def test_model_cached_generation_with_the_kernel(monkeypatch):
    """Prefill with the kernel (final state into the cache), then decode steps: equal to full forwards."""
    monkeypatch.delenv(kp.ENV_VAR, raising=False)
    model = tiny_mamba2_lm(num_hidden_layers=2, state_sizes=[7, 1]).eval()
    prompt = random_ids(batch=2, length=9)
    with torch.no_grad():
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
        full = model(generated, use_cache=False).logits
        steps, _ = cached_decode_logits(model, generated, prefill=9)
    torch.testing.assert_close(steps, full[:, 8:-1], atol=1e-5, rtol=1e-5)
