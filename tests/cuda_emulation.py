"""Emulated CUDA kernels: run the ``mamba_ssm`` / ``causal_conv1d`` code paths on CPU tensors, without a GPU.

``mamba_ssm`` and ``causal_conv1d`` install without compiling CUDA (``MAMBA_SKIP_CUDA_BUILD=TRUE``,
``CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE``, ``*_FORCE_BUILD=TRUE``, ``--no-deps --no-build-isolation``; see ``.ci/run``);
only their compiled extensions (``selective_scan_cuda``, ``causal_conv1d_cuda``) and the triton kernels are
missing. :func:`emulated_cuda` puts stand-in modules in their place whose functions

* first reproduce the compiled kernel's input checks (dtypes, ``d_state <= 256``, conv width 2-4, strides and
  channel-last alignment, shapes), raising :class:`KernelCheckError` for a call the real kernel would reject,
* then compute with the library's own pure-torch reference (``selective_scan_ref``, ``causal_conv1d_ref``,
  ``causal_conv1d_update_ref``, ``selective_state_update_ref``); a backward is autograd through the reference.

Everything above the extensions -- ``SelectiveScanFn``, ``MambaInnerFn`` with its recompute-in-backward,
``CausalConv1dFn``, the ``torch.library`` custom ops -- is the installed library code, run as on a GPU. Callers
map CPU tensors to the ``"cuda"`` device type of their kernel policy (``device_hooks``), so the policy takes its
CUDA branch. Each stand-in counts its calls in the returned :class:`collections.Counter`.

General on purpose: :func:`emulated_cuda` takes any extra stand-in modules and attribute patches (e.g. reference
functions for other triton kernels: :func:`ssd_patches` for Mamba-2's SSD and gated RMS norm), and
:func:`stock_mamba_patches` / :func:`stock_mamba2_patches` point stock transformers Mamba / Mamba-2 at the same
emulated kernels.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch


PACKAGES = ("mamba_ssm", "causal_conv1d", "einops", "triton")
EXTENSIONS = ("selective_scan_cuda", "causal_conv1d_cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelCheckError(RuntimeError):
    """A call the compiled kernel would reject (its ``TORCH_CHECK`` failed)."""


def missing_packages() -> list[str]:
    """The packages the emulation needs that are not installed (empty: it can run)."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelCheckError(msg)


def _shape(t: torch.Tensor, *shape: int, name: str) -> None:
    _check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _vjp(fn: Callable, inputs: list, grad_out: torch.Tensor) -> list:
    """Gradients of ``fn(*inputs)`` (None inputs pass through) against ``grad_out``, zeros where unused. ``fn`` may
    return a tuple, with a tuple ``grad_out`` (None entries: that output gets no gradient).

    Runs on a fresh thread: the body of a ``torch.library`` custom op (causal_conv1d's) runs with autograd's
    dispatch keys excluded in this thread, where even ``enable_grad`` would build no graph."""

    def work():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        with torch.enable_grad():
            y = fn(*leaves)
        used = [t for t in leaves if t is not None]
        ys, gs = (y, grad_out) if isinstance(y, tuple) else ((y,), (grad_out,))
        pairs = [(a, g) for a, g in zip(ys, gs) if g is not None]  # a tuple output: None grads are skipped
        grads = iter(torch.autograd.grad([a for a, _ in pairs], used, [g for _, g in pairs], allow_unused=True))
        got = [None if t is None else next(grads) for t in leaves]
        return [None if t is None else (torch.zeros_like(t) if g is None else g) for t, g in zip(leaves, got)]

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(work).result()


# ------------------------------------------------------------------------------------------- selective_scan_cuda


def check_selective_scan(u, delta, A, B, C, D, z, delta_bias) -> None:
    """The input checks of ``selective_scan_cuda.fwd`` (csrc/selective_scan/selective_scan.cpp)."""
    itype, wtype = u.dtype, A.dtype
    _check(itype in KERNEL_DTYPES, f"selective_scan: input type must be float32/float16/bfloat16, got {itype}")
    _check(wtype in (torch.float32, torch.complex64), f"selective_scan: weight (A) must be float32, got {wtype}")
    _check(delta.dtype == itype, f"selective_scan: delta dtype {delta.dtype} != input dtype {itype}")
    for name, t in (("B", B), ("C", C)):
        variable = t.dim() >= 3
        want = itype if variable else wtype
        _check(t.dtype == want, f"selective_scan: {name} dtype {t.dtype} != {want}")
    _check(u.stride(-1) == 1 or u.size(-1) == 1, "selective_scan: u must be contiguous in its last dim")
    _check(delta.stride(-1) == 1 or delta.size(-1) == 1, "selective_scan: delta must be contiguous in its last dim")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    _check(dstate <= 256, "selective_scan only supports state dimension <= 256")
    _shape(delta, batch, dim, seqlen, name="delta")
    _shape(A, dim, dstate, name="A")
    for name, t in (("B", B), ("C", C)):
        if t.dim() >= 3:
            _check(t.dim() == 4, f"selective_scan: variable {name} must be (batch, groups, dstate, L)")
            _shape(t, batch, t.shape[1], dstate, seqlen, name=name)
            _check(t.stride(-1) == 1 or t.size(-1) == 1, f"selective_scan: {name} must be contiguous in L")
    if D is not None:
        _check(D.dtype == torch.float32, f"selective_scan: D must be float32, got {D.dtype}")
        _check(D.stride(-1) == 1 or D.size(-1) == 1, "selective_scan: D must be contiguous")
        _shape(D, dim, name="D")
    if delta_bias is not None:
        _check(delta_bias.dtype == torch.float32, f"selective_scan: delta_bias must be float32, got {delta_bias.dtype}")
        _check(delta_bias.stride(-1) == 1 or delta_bias.size(-1) == 1, "selective_scan: delta_bias not contiguous")
        _shape(delta_bias, dim, name="delta_bias")
    if z is not None:
        _check(z.dtype == itype, f"selective_scan: z dtype {z.dtype} != input dtype {itype}")
        _check(z.stride(-1) == 1 or z.size(-1) == 1, "selective_scan: z must be contiguous in its last dim")
        _shape(z, batch, dim, seqlen, name="z")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    _check(len({t.device for t in tensors}) == 1, "selective_scan: all tensors must be on one device")


def make_selective_scan_cuda(calls: Counter) -> types.ModuleType:
    """A stand-in ``selective_scan_cuda`` (``fwd``/``bwd``) on ``mamba_ssm``'s ``selective_scan_ref``."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        calls["selective_scan_fwd"] += 1
        check_selective_scan(u, delta, A, B, C, D, z, delta_bias)
        with torch.no_grad():
            out, last = selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus, True)
            n_chunks = -(-u.shape[-1] // 2048)
            x = A.new_zeros(u.shape[0], u.shape[1], n_chunks, 2 * A.shape[1])
            x[:, :, -1, 1::2] = last  # mamba_ssm reads the last state from here
            if z is None:
                return [out, x]
            return [out, x, selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)]

    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
        calls["selective_scan_bwd"] += 1
        check_selective_scan(u, delta, A, B, C, D, z, delta_bias)
        _check(dout.dtype == u.dtype, f"selective_scan bwd: dout dtype {dout.dtype} != input dtype {u.dtype}")
        _check(dout.stride(-1) == 1 or dout.size(-1) == 1, "selective_scan bwd: dout must be contiguous in L")
        _shape(dout, *u.shape, name="dout")
        if dz is not None:
            _check(z is not None and dz.dtype == u.dtype, "selective_scan bwd: dz needs z and the input dtype")
            _shape(dz, *u.shape, name="dz")
        du, ddelta, dA, dB, dC, dD, dz_ref, ddelta_bias = _vjp(
            lambda *t: selective_scan_ref(*t, delta_softplus), [u, delta, A, B, C, D, z, delta_bias], dout
        )
        result = [du, ddelta, dA, dB, dC, dD, ddelta_bias]
        if z is not None:
            if dz is not None:
                dz.copy_(dz_ref)  # the kernel writes into a caller-provided dz (MambaInnerFn passes a view of dxz)
                dz_ref = dz
            result.append(dz_ref)
        if recompute_out_z:
            with torch.no_grad():
                result.append(selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus))
        return result

    mod = types.ModuleType("selective_scan_cuda")
    mod.fwd, mod.bwd = fwd, bwd
    mod.__emulated__ = True
    return mod


# -------------------------------------------------------------------------------------------- causal_conv1d_cuda


def check_causal_conv1d(x, weight, bias, seq_idx=None, initial_states=None, final_states_out=None) -> None:
    """The input checks of ``causal_conv1d_cuda.causal_conv1d_fwd``/``bwd`` (csrc/causal_conv1d.cpp)."""
    _check(x.dtype in KERNEL_DTYPES, f"causal_conv1d: input type must be float32/float16/bfloat16, got {x.dtype}")
    _check(weight.dtype in KERNEL_DTYPES, f"causal_conv1d: weight type must be float/half/bf16, got {weight.dtype}")
    batch, dim, seqlen = x.shape
    width = weight.shape[-1]
    _shape(weight, dim, width, name="weight")
    _check(x.stride(2) == 1 or x.stride(1) == 1, "causal_conv1d: x must be contiguous in L or in channels")
    channel_last = x.stride(1) == 1 and x.stride(2) > 1
    if channel_last:
        _check(dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
        _check(
            x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0,
            "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be multiples of 8",
        )
    _check(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
    if bias is not None:
        _check(bias.dtype == weight.dtype, f"causal_conv1d: bias dtype {bias.dtype} != weight dtype {weight.dtype}")
        _check(bias.stride(-1) == 1, "causal_conv1d: bias must be contiguous")
        _shape(bias, dim, name="bias")
    for name, t in (("seq_idx", seq_idx), ("initial_states", initial_states), ("final_states", final_states_out)):
        if t is not None:
            _check(channel_last, f"causal_conv1d: {name} is only supported for channel-last layout")


def make_causal_conv1d_cuda(calls: Counter) -> types.ModuleType:
    """A stand-in ``causal_conv1d_cuda`` on ``causal_conv1d_ref`` / ``causal_conv1d_update_ref``."""

    def ref(*args, **kwargs):  # imported lazily: the package's import needs this very stand-in
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

        return causal_conv1d_ref(*args, **kwargs)

    def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu_activation):
        calls["causal_conv1d_fwd"] += 1
        check_causal_conv1d(x, weight, bias, seq_idx, initial_states, final_states_out)
        _check(seq_idx is None, "emulation: seq_idx is not emulated")
        with torch.no_grad():
            res = ref(
                x,
                weight,
                bias,
                initial_states=initial_states,
                return_final_states=final_states_out is not None,
                final_states_out=final_states_out,
                activation="silu" if silu_activation else None,
            )
        out.copy_(res[0] if isinstance(res, tuple) else res)

    def causal_conv1d_bwd(
        x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, dweight, dbias, dinitial_states, silu
    ):
        calls["causal_conv1d_bwd"] += 1
        check_causal_conv1d(x, weight, bias, seq_idx, initial_states)
        _check(seq_idx is None and dfinal_states is None, "emulation: seq_idx/dfinal_states are not emulated")
        _shape(dout, *x.shape, name="dout")
        act = "silu" if silu else None
        gx, gw, gb, gi = _vjp(
            lambda x_, w_, b_, i_: ref(x_, w_, b_, initial_states=i_, activation=act),
            [x, weight, bias, initial_states],
            dout,
        )
        dx.copy_(gx)
        dweight.copy_(gw)
        if dbias is not None:
            dbias.copy_(gb)
        if dinitial_states is not None:
            dinitial_states.copy_(gi)

    def causal_conv1d_update(x, conv_state, weight, bias, out, silu, cache_seqlens, conv_state_indices):
        calls["causal_conv1d_update"] += 1
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_update_ref

        _check(x.dtype in KERNEL_DTYPES, f"causal_conv1d_update: input type must be float/half/bf16, got {x.dtype}")
        _check(weight.dtype in KERNEL_DTYPES, "causal_conv1d_update: weight type must be float/half/bf16")
        _check(conv_state.dtype == x.dtype, f"causal_conv1d_update: conv_state dtype {conv_state.dtype} != {x.dtype}")
        batch, dim, _ = x.shape
        width = weight.shape[-1]
        _check(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
        _shape(weight, dim, width, name="weight")
        _check(conv_state.shape[1] == dim and conv_state.shape[2] >= width - 1, "causal_conv1d_update: conv_state")
        _check(conv_state_indices is None, "emulation: conv_state_indices are not emulated")
        if bias is not None:
            _check(bias.dtype == weight.dtype, "causal_conv1d_update: bias dtype != weight dtype")
            _shape(bias, dim, name="bias")
        with torch.no_grad():
            res = causal_conv1d_update_ref(x, conv_state, weight, bias, "silu" if silu else None, cache_seqlens)
        out.copy_(res)

    mod = types.ModuleType("causal_conv1d_cuda")
    mod.causal_conv1d_fwd, mod.causal_conv1d_bwd, mod.causal_conv1d_update = (
        causal_conv1d_fwd,
        causal_conv1d_bwd,
        causal_conv1d_update,
    )
    mod.__emulated__ = True
    return mod


# --------------------------------------------------------------------------------- triton selective_state_update


def make_state_update(calls: Counter) -> Callable:
    """A stand-in for the triton ``selective_state_update`` on ``selective_state_update_ref`` (updates in place)."""
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, **kwargs):
        calls["selective_state_update"] += 1
        _check(not kwargs.get("state_batch_indices"), "emulation: state_batch_indices are not emulated")
        for name, t in (("state", state), ("x", x), ("dt", dt), ("B", B), ("C", C)):
            _check(t.dtype in KERNEL_DTYPES, f"selective_state_update: {name} dtype {t.dtype} (float/half/bf16)")
        tie = A.stride(-1) == 0 and A.stride(-2) == 0 and dt.stride(-1) == 0
        _check(not (tie and dt_bias is None), "selective_state_update: tied head dims need dt_bias")
        tensors = [t for t in (state, x, dt, A, B, C, D, z, dt_bias) if t is not None]
        _check(len({t.device for t in tensors}) == 1, "selective_state_update: all tensors must be on one device")
        with torch.no_grad():
            return selective_state_update_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)

    return selective_state_update


# ------------------------------------------------------------------------------- triton SSD kernels (Mamba-2)

SSD = "mamba_ssm.ops.triton.ssd_combined"


def ssd_reference(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    dt_softplus=False,
    dt_limit=(0.0, float("inf")),
):
    """The chunked SSD of ``_mamba_chunk_scan_combined_fwd`` from ``mamba_ssm``'s pure-torch references
    (``chunk_state_ref``, ``state_passing_ref``, ``chunk_scan_ref``), with initial and final states.

    Returns ``(out, out_x, dt, dA_cumsum, states, final_states)`` like the kernel (``out_x``: before the ``z`` gate);
    the sequence is zero-padded to whole chunks with ``dt = 0`` there, as the kernel masks it."""
    import torch.nn.functional as F
    from einops import rearrange
    from mamba_ssm.ops.triton.ssd_chunk_scan import chunk_scan_ref
    from mamba_ssm.ops.triton.ssd_chunk_state import chunk_state_ref
    from mamba_ssm.ops.triton.ssd_state_passing import state_passing_ref

    seqlen, dstate = x.shape[1], B.shape[-1]
    pad = (-seqlen) % chunk_size
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    dt, x, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (dt, x, B, C))
    dt = rearrange(dt, "b (c l) h -> b h c l", l=chunk_size)
    dA_cumsum = torch.cumsum(dt * A.float()[:, None, None], dim=-1)
    states = chunk_state_ref(B, x, dt, dA_cumsum).float()
    init = rearrange(initial_states.float(), "... p n -> ... (p n)") if initial_states is not None else None
    states, final = state_passing_ref(rearrange(states, "... p n -> ... (p n)"), dA_cumsum[:, :, :, -1], init)
    states, final = (rearrange(t, "... (p n) -> ... p n", n=dstate) for t in (states, final))
    out_x = chunk_scan_ref(B, C, x, dt, dA_cumsum, states.to(C.dtype), D=D)[:, :seqlen]
    out = out_x if z is None else out_x * F.silu(z)
    return out, out_x, dt, dA_cumsum, states, final


def check_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, cu_seqlens=None):
    """The input checks of ``_mamba_chunk_scan_combined_fwd`` (its asserts) and of the triton launchers' inputs."""
    _check(x.dim() == 4 and B.dim() == 4, "ssd: x must be (b, L, h, p) and B (b, L, g, n)")
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    _check(nheads % ngroups == 0, f"ssd: nheads {nheads} must be a multiple of ngroups {ngroups}")
    _shape(B, batch, seqlen, ngroups, dstate, name="B")
    _shape(C, batch, seqlen, ngroups, dstate, name="C")
    _shape(dt, batch, seqlen, nheads, name="dt")
    _shape(A, nheads, name="A")
    if z is not None:
        _shape(z, *x.shape, name="z")
    if D is not None:
        _check(tuple(D.shape) in ((nheads, headdim), (nheads,)), f"ssd: D must be (h, p) or (h,), got {tuple(D.shape)}")
    if dt_bias is not None:
        _shape(dt_bias, nheads, name="dt_bias")
    if initial_states is not None:
        _shape(initial_states, batch, nheads, headdim, dstate, name="initial_states")
    _check(seq_idx is None and cu_seqlens is None, "emulation: seq_idx/cu_seqlens are not emulated")
    for name, t in (("x", x), ("B", B), ("C", C), ("dt", dt)):
        _check(t.dtype in KERNEL_DTYPES, f"ssd: {name} dtype {t.dtype} (float/half/bf16)")
    tensors = [t for t in (x, dt, A, B, C, D, z, dt_bias, initial_states) if t is not None]
    _check(len({t.device for t in tensors}) == 1, "ssd: all tensors must be on one device")


def make_ssd_fwd(calls: Counter) -> Callable:
    """A stand-in ``_mamba_chunk_scan_combined_fwd`` on :func:`ssd_reference`."""

    def fwd(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=None,
        z=None,
        dt_bias=None,
        initial_states=None,
        seq_idx=None,
        cu_seqlens=None,
        dt_softplus=False,
        dt_limit=(0.0, float("inf")),
    ):
        calls["ssd_fwd"] += 1
        check_ssd(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens)
        with torch.no_grad():
            return ssd_reference(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit)

    return fwd


def make_ssd_bwd(calls: Counter) -> Callable:
    """A stand-in ``_mamba_chunk_scan_combined_bwd``: autograd through :func:`ssd_reference`; like the kernel it
    writes into the caller's ``dx``/``ddt``/``dB``/``dC``/``dz`` (the fused Mamba-2 kernel passes views of one
    buffer) and returns ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states[, out])``."""

    def bwd(
        dout,
        x,
        dt,
        A,
        B,
        C,
        out,
        chunk_size,
        D=None,
        z=None,
        dt_bias=None,
        initial_states=None,
        dfinal_states=None,
        seq_idx=None,
        dt_softplus=False,
        dt_limit=(0.0, float("inf")),
        dx=None,
        ddt=None,
        dB=None,
        dC=None,
        dz=None,
        recompute_output=False,
    ):
        calls["ssd_bwd"] += 1
        check_ssd(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
        _shape(dout, *x.shape, name="dout")
        _shape(out, *x.shape, name="out")
        _check(dz is None or z is not None, "ssd bwd: dz needs z")

        def ref(*t):
            res = ssd_reference(*t[:5], chunk_size, *t[5:], dt_softplus=dt_softplus, dt_limit=dt_limit)
            return res[0], res[5]

        grads = _vjp(ref, [x, dt, A, B, C, D, z, dt_bias, initial_states], (dout, dfinal_states))
        gx, gdt, gA, gB, gC, gD, gz, gdt_bias, ginit = grads
        for given, g in ((dx, gx), (ddt, gdt), (dB, gB), (dC, gC), (dz, gz)):
            if given is not None:
                given.copy_(g)
        result = (
            gx if dx is None else dx,
            gdt if ddt is None else ddt,
            gA,
            gB if dB is None else dB,
            gC if dC is None else dC,
            gD,
            gz if dz is None else dz,
            gdt_bias,
            ginit,
        )
        if recompute_output:
            with torch.no_grad():
                result = (*result, ref(x, dt, A, B, C, D, z, dt_bias, initial_states)[0])
        return result

    return bwd


def check_layer_norm(x, weight, bias, z, group_size, is_rms_norm):
    """The input checks of ``layernorm_gated._layer_norm_fwd``/``_bwd``; only the RMS norm is emulated."""
    _check(is_rms_norm, "emulation: only the gated RMS norm is emulated")
    M, N = x.shape
    group_size = N if group_size is None else group_size
    _check(N % group_size == 0, f"layer_norm: N {N} is not a multiple of group_size {group_size}")
    _check(x.stride(-1) == 1, "layer_norm: x must be contiguous in its last dim")
    if z is not None:
        _check(z.stride(-1) == 1, "layer_norm: z must be contiguous in its last dim")
        _shape(z, M, N, name="z")
    _shape(weight, N, name="weight")
    _check(weight.stride(-1) == 1, "layer_norm: weight must be contiguous")
    if bias is not None:
        _shape(bias, N, name="bias")
    return group_size


def make_layer_norm_fwd(calls: Counter) -> Callable:
    """A stand-in for the triton ``_layer_norm_fwd`` (gated RMS norm) on ``rms_norm_ref``."""
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref

    def fwd(x, weight, bias, eps, z=None, out=None, group_size=None, norm_before_gate=True, is_rms_norm=False):
        calls["layer_norm_fwd"] += 1
        group_size = check_layer_norm(x, weight, bias, z, group_size, is_rms_norm)
        with torch.no_grad():
            y = rms_norm_ref(x, weight, bias, z, eps, group_size, norm_before_gate)
        if out is not None:
            _shape(out, *x.shape, name="out")
            _check(out.stride(-1) == 1, "layer_norm: out must be contiguous in its last dim")
            out.copy_(y)
            y = out
        rows = x.float() if z is None or norm_before_gate else x.float() * torch.nn.functional.silu(z.float())
        rstd = rows.view(x.shape[0], -1, group_size).square().mean(-1).add(eps).rsqrt().reshape(-1)
        return y, None, rstd

    return fwd


def make_layer_norm_bwd(calls: Counter) -> Callable:
    """A stand-in for the triton ``_layer_norm_bwd``: autograd through ``rms_norm_ref``; writes ``dz``/``out``
    into the caller's buffers like the kernel."""
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref

    def bwd(
        dy,
        x,
        weight,
        bias,
        eps,
        mean,
        rstd,
        z=None,
        group_size=None,
        norm_before_gate=True,
        is_rms_norm=False,
        recompute_output=False,
        dz=None,
        out=None,
    ):
        calls["layer_norm_bwd"] += 1
        group_size = check_layer_norm(x, weight, bias, z, group_size, is_rms_norm)
        _shape(dy, *x.shape, name="dy")
        _check(dy.stride(-1) == 1, "layer_norm bwd: dy must be contiguous in its last dim")
        _check(dz is None or z is not None, "layer_norm bwd: dz needs z")

        def ref(x_, w_, b_, z_):
            return rms_norm_ref(x_, w_, b_, z_, eps, group_size, norm_before_gate)

        gx, gw, gb, gz = _vjp(ref, [x, weight, bias, z], dy)
        if dz is not None:
            dz.copy_(gz)
            gz = dz
        result = (gx, gw, gb, gz)
        if recompute_output:
            with torch.no_grad():
                y = ref(x, weight, bias, z)
            if out is not None:
                out.copy_(y)
                y = out
            result = (*result, y)
        return result

    return bwd


def _needs_calls(make: Callable) -> Callable:
    make.__needs_calls__ = True
    return make


def ssd_patches() -> list[tuple]:
    """Patches that put the SSD and gated-RMS-norm stand-ins behind ``mamba_ssm``'s Mamba-2 code: the installed
    ``MambaChunkScanCombinedFn`` and ``MambaSplitConv1dScanCombinedFn`` (split, ``ensure_stride``, channel-last
    ``causal_conv1d`` calls, buffers, out-projection gradient) run as on a GPU; only their triton launchers
    ``_mamba_chunk_scan_combined_fwd``/``_bwd`` and ``_layer_norm_fwd``/``_bwd`` are replaced. Calls are counted
    (``ssd_fwd``, ``ssd_bwd``, ``layer_norm_fwd``, ``layer_norm_bwd``, ``mamba_chunk_scan_combined``,
    ``mamba_split_conv1d_scan_combined``)."""

    def counted(name):
        return _needs_calls(lambda calls: _counted(getattr(sys.modules[SSD], name), calls, name))

    return [
        (SSD, "_mamba_chunk_scan_combined_fwd", _needs_calls(make_ssd_fwd)),
        (SSD, "_mamba_chunk_scan_combined_bwd", _needs_calls(make_ssd_bwd)),
        (SSD, "_layer_norm_fwd", _needs_calls(make_layer_norm_fwd)),
        (SSD, "_layer_norm_bwd", _needs_calls(make_layer_norm_bwd)),
        (SSD, "mamba_chunk_scan_combined", counted("mamba_chunk_scan_combined")),
        (SSD, "mamba_split_conv1d_scan_combined", counted("mamba_split_conv1d_scan_combined")),
    ]


def stock_mamba2_patches() -> list[tuple]:
    """Patches that make stock transformers Mamba-2 call the (emulated) kernels, as it does when ``mamba_ssm`` and
    ``causal_conv1d`` are installed at import time."""
    import transformers.models.mamba2.modeling_mamba2 as mm

    def lookup(module: str, name: str) -> Callable:
        return lambda *a, **k: _filtered(getattr(sys.modules[module], name))(*a, **k)

    return [
        (mm, "mamba2_split_conv1d_scan_combined", lookup(SSD, "mamba_split_conv1d_scan_combined")),
        (mm, "mamba2_chunk_scan", lookup(SSD, "mamba_chunk_scan_combined")),
        (
            mm,
            "mamba2_selective_state_update",
            lookup("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
        ),
        (mm, "causal_conv1d_fn", lookup("causal_conv1d.causal_conv1d_interface", "causal_conv1d_fn")),
        (mm, "causal_conv1d_update", lookup("causal_conv1d.causal_conv1d_interface", "causal_conv1d_update")),
    ]


# ---------------------------------------------------------------------------------------------------- the switch

_LOADED: dict[str, types.ModuleType] = {}  # package modules imported once per process under the stand-ins


def _package_modules() -> dict[str, types.ModuleType]:
    return {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("mamba_ssm", "causal_conv1d")}


@contextlib.contextmanager
def emulated_cuda(
    device_hooks: tuple = (),
    patches: tuple = (),
    stand_ins: dict[str, types.ModuleType] | None = None,
    import_caches: tuple[dict, ...] = (),
) -> Iterator[Counter]:
    """Run the ``mamba_ssm``/``causal_conv1d`` code on CPU tensors with emulated kernels (see the module docstring).

    Args:
        device_hooks: ``(module, attribute)`` pairs naming a device-type function (tensor/device -> str) of a
            kernel policy; inside the block it answers ``"cuda"`` for CPU tensors.
        patches: extra ``(object, attribute, value)`` patches (e.g. :func:`stock_mamba_patches`, or reference
            functions in place of other triton kernels, :func:`ssd_patches`). ``object`` may be the name of a
            ``mamba_ssm``/``causal_conv1d`` module (resolved inside the block); a ``value`` marked
            ``__needs_calls__`` is called with the call ``Counter`` to make the patched value.
        stand_ins: extra ``{module name: module}`` put in ``sys.modules``.
        import_caches: dicts of remembered import results (e.g. a kernel policy's ``_IMPORTS``) to empty inside
            the block and restore after.

    Yields a ``Counter`` of kernel calls. On exit ``sys.modules`` and every patch are restored, so the rest of the
    process sees the packages exactly as before (importable only with their compiled extensions).
    """
    missing = missing_packages()
    if missing:
        raise RuntimeError(f"CUDA emulation needs {missing} installed (see .ci/run)")
    calls: Counter = Counter()
    saved_modules = {k: sys.modules.get(k) for k in (*EXTENSIONS, *(stand_ins or {}))}
    saved_packages = _package_modules()
    saved_caches = [dict(c) for c in import_caches]
    undo: list[tuple] = []
    try:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")  # replaced below
        sys.modules["causal_conv1d_cuda"] = make_causal_conv1d_cuda(calls)
        for name, mod in (stand_ins or {}).items():
            sys.modules[name] = mod
        sys.modules.update(_LOADED)
        if not _LOADED:
            importlib.import_module("causal_conv1d")
            importlib.import_module("mamba_ssm.ops.selective_scan_interface")
            importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
            importlib.import_module("mamba_ssm.ops.triton.ssd_combined")  # Mamba-2 (see ssd_patches)
            _LOADED.update(_package_modules())
        scan_ext = make_selective_scan_cuda(calls)
        sys.modules["selective_scan_cuda"] = scan_ext
        interface = sys.modules["mamba_ssm.ops.selective_scan_interface"]
        step_mod = sys.modules["mamba_ssm.ops.triton.selective_state_update"]
        cpp = sys.modules["causal_conv1d.cpp_functions"]
        todo = [
            (interface, "selective_scan_cuda", scan_ext),  # bound at the package's import
            (cpp, "causal_conv1d_cuda", sys.modules["causal_conv1d_cuda"]),
            (step_mod, "selective_state_update", make_state_update(calls)),
            (interface, "mamba_inner_fn", _counted(interface.mamba_inner_fn, calls, "mamba_inner_fn")),
        ]
        for owner, attr in device_hooks:
            real = getattr(owner, attr)
            todo.append((owner, attr, lambda d, _real=real: "cuda" if _real(d) == "cpu" else _real(d)))
        todo.extend(patches)
        for owner, attr, value in todo:
            if isinstance(owner, str):  # a package module, by name: resolved under the stand-ins
                owner = sys.modules[owner]
            if callable(value) and getattr(value, "__needs_calls__", False):
                value = value(calls)
            undo.append((owner, attr, getattr(owner, attr, _MISSING)))
            setattr(owner, attr, value)
        for cache in import_caches:
            for key in [k for k in cache if k.split(".")[0] in ("mamba_ssm", "causal_conv1d")]:
                del cache[key]
        yield calls
    finally:
        for owner, attr, old in reversed(undo):
            if old is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        for cache, saved in zip(import_caches, saved_caches):
            cache.clear()
            cache.update(saved)
        for k in list(_package_modules()):
            if k not in saved_packages:
                del sys.modules[k]
        sys.modules.update(saved_packages)
        for k, v in saved_modules.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


_MISSING = object()


def _counted(fn: Callable, calls: Counter, key: str) -> Callable:
    fn = getattr(fn, "__wrapped_emulated__", fn)

    def call(*args, **kwargs):
        calls[key] += 1
        return fn(*args, **kwargs)

    call.__wrapped_emulated__ = fn
    return call


def _filtered(fn: Callable) -> Callable:
    """``fn`` called with only the keyword arguments it accepts (as transformers' kernel wrappers do)."""
    import inspect

    params = set(inspect.signature(getattr(fn, "__wrapped_emulated__", fn)).parameters)

    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if k in params})

    return call


def stock_mamba_patches() -> list[tuple]:
    """Patches that make stock transformers Mamba call the (emulated) ``mamba_ssm``/``causal_conv1d`` kernels, as it
    does when they are installed at import time (transformers binds the kernels when it imports the model file)."""
    import transformers.models.mamba.modeling_mamba as mm

    def lookup(module: str, name: str) -> Callable:
        return lambda *a, **k: _filtered(getattr(sys.modules[module], name))(*a, **k)

    return [
        (mm, "mamba_inner_fn", lookup("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn")),
        (mm, "mamba_selective_scan", lookup("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")),
        (
            mm,
            "mamba_selective_state_update",
            lookup("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
        ),
        (mm, "causal_conv1d_fn", lookup("causal_conv1d.causal_conv1d_interface", "causal_conv1d_fn")),
        (mm, "causal_conv1d_update", lookup("causal_conv1d.causal_conv1d_interface", "causal_conv1d_update")),
    ]
