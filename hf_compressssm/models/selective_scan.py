"""Selective scan (Mamba-1 SSM recurrence) with a fast CPU kernel, the CUDA kernels, and a pure-torch fallback.

This file stands on its own: it is copied next to saved weights as Hugging Face remote code, so it imports only
``torch``, ``numpy``, the standard library and its sibling ``kernel_policy.py`` (which picks the backend);
``numba``, ``mamba_ssm`` and ``mambapy`` are optional and imported lazily, only when their backend is used.

Semantics (identical to ``transformers.models.mamba.modeling_mamba.mamba_selective_scan``)::

    dt_t  = softplus(delta_t + delta_bias)          (softplus only if delta_softplus)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t        h_{-1} = initial_state or 0
    y_t   = <h_t, C_t> + D * u_t
    out_t = y_t * silu(z_t)                         (gate only if z is given)

with ``u, delta, z: (batch, D, L)``, ``A: (D, N)`` (already negative, ``-exp(A_log)``), ``B, C: (batch, N, L)``,
``D, delta_bias: (D,)``, states ``(batch, D, N)``.

Backends, chosen by ``kernel_policy.plan_kernels`` from the tensors' device and dtype at *call* time:

* ``"numba"`` (alias ``"fast"``) -- CPU. :class:`SelectiveScanFunction`, a ``torch.autograd.Function`` with an
  exact hand-written backward. Inside the kernels channels are laid out in blocks of 64 SIMD lanes; the forward
  streams over time keeping the block's state for one state index ``n`` in a 64-wide buffer; the backward
  recomputes those states into an ``(L, 64)`` scratch buffer and runs the reverse-time recurrence
  ``G_t = exp(dt_{t+1} A) G_{t+1} + C_t dy_t`` (``G_t = dL/dh_t``), then the element-wise terms. Parallel over
  (batch row, channel block) work items on a small thread pool sized by ``torch.get_num_threads()`` (the kernels
  release the GIL; numba's own OpenMP layer is not used). It never materialises a ``(batch, D, L, N)`` tensor:
  memory is O(batch*D*L + batch*L*N) (the dB/dC partial sums are (batch, groups, N, L) with a few groups per batch
  row) plus O(L*64) scratch per thread. ``exp`` is a vectorisable Cody-Waite + Taylor polynomial (about 1 ulp;
  results below the smallest normal number flush to zero). float32 and float64 are supported (float64 inputs
  are computed in float64; float16/bfloat16 inputs in float32).
* ``"mamba_ssm"`` -- CUDA, when ``mamba_ssm`` is importable and the inputs are within its limits (float32,
  float16 or bfloat16; state size <= 256). A call with ``initial_state`` (not supported by that kernel) falls back
  to ``"torch"`` on the same device.
* ``"mambapy"`` -- ``mambapy``'s parallel scan (O(batch*D*L*N) memory), only when forced.
* ``"torch"`` -- pure torch, any device: a sequential scan in time chunks, each chunk recomputed in the backward
  (activation checkpointing), so its memory is O(batch*D*L + batch*D*N*L/chunk + batch*D*N*chunk).

``"auto"`` picks ``mamba_ssm`` on CUDA when importable and within its limits, ``numba`` on CPU when importable,
else ``torch``. A backend is forced by the ``backend`` argument (e.g. from the model config's ``scan_backend``) or
by the environment variable ``HF_COMPRESSSSM_SCAN_BACKEND`` (``auto``, ``fast``/``numba``, ``torch``, ``mambapy``,
``mamba_ssm``), which overrides the argument when set to anything but ``auto``. A forced backend that cannot run
(not installed, wrong device, or inputs outside a kernel's limits) raises a ``RuntimeError``; see
``kernel_policy.py`` for the whole policy.

JIT warm-up: the numba kernels compile on their first use in a process (once per dtype, float32 and float64) and
are cached on disk (``cache=True``: in ``__pycache__`` next to this file, or under ``NUMBA_CACHE_DIR``); later
processes load them from the cache (docs/kernels.md has the measured times). Importing this module does not import
numba.
"""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F


try:
    from . import kernel_policy as _policy
except ImportError:  # this file loaded by path, on its own (no package): load its sibling the same way
    import importlib.util as _ilu
    import sys as _sys

    _spec = _ilu.spec_from_file_location(
        f"{__name__}_kernel_policy", os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_policy.py")
    )
    _policy = _ilu.module_from_spec(_spec)
    _sys.modules[_spec.name] = _policy
    _spec.loader.exec_module(_policy)

ENV_VAR = _policy.ENV_VAR
BACKENDS = _policy.BACKENDS
KERNEL_DTYPES = _policy.KERNEL_DTYPES
available_backends = _policy.available_backends
resolve_scan_backend = _policy.resolve_scan_backend
_LOCK = _policy._LOCK
_IMPORTS = _policy._IMPORTS
_try_import = _policy._try_import
_mamba_ssm_importable = _policy._mamba_ssm_importable


__all__ = [
    "ENV_VAR",
    "BACKENDS",
    "SelectiveScanFunction",
    "available_backends",
    "resolve_scan_backend",
    "selective_scan",
    "selective_state_update",
]


# --------------------------------------------------------------------------------------------------------------
# helpers shared by the torch paths
# --------------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors):
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L), got shape {tuple(u.shape)}")
    bsz, dim, seqlen = u.shape
    if tuple(delta.shape) != (bsz, dim, seqlen):
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (D={dim}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (bsz, n, seqlen):
            raise ValueError(f"{name} must be (batch, N, L) = {(bsz, n, seqlen)}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(t.shape)}")
    if z is not None and tuple(z.shape) != (bsz, dim, seqlen):
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (bsz, dim, n):
        raise ValueError(f"initial_state must be (batch, D, N) = {(bsz, dim, n)}, got {tuple(initial_state.shape)}")


def _discretised_dt(delta, delta_bias, delta_softplus, cd):
    dt = delta.to(cd)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cd)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    return dt


def _finish(y, u, D, z, cd):
    if D is not None:
        y = y + u.to(cd) * D.to(cd)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype)


def _torch_chunk(h, dt, dtu, A, B, C):
    """Sequential scan over one time chunk. h (b, D, N); dt, dtu (b, D, T); A (D, N); B, C (b, N, T)."""
    decay = torch.exp(dt.unsqueeze(-1) * A[:, None, :])  # (b, D, T, N)
    drive = dtu.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, D, T, N)
    states = []
    for a_t, b_t in zip(decay.unbind(2), drive.unbind(2)):  # unbind once: the backward stays linear in T
        h = torch.addcmul(b_t, a_t, h)
        states.append(h)
    hs = torch.stack(states, 2)
    y = torch.einsum("bdtn,bnt->bdt", hs, C)
    return y, h


def _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk=None):
    cd = _compute_dtype(u, delta, A, B, C, initial_state)
    bsz, dim, seqlen = u.shape
    n = A.shape[1]
    dt = _discretised_dt(delta, delta_bias, delta_softplus, cd)
    dtu = dt * u.to(cd)
    Ac, Bc, Cc = A.to(cd), B.to(cd), C.to(cd)
    if initial_state is not None:
        h = initial_state.to(cd)
    else:
        h = torch.zeros(bsz, dim, n, dtype=cd, device=u.device)
    if chunk is None:
        chunk = int(max(4, min(128, (1 << 22) // max(1, bsz * dim * n))))
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)
    )
    ys = []
    for s in range(0, seqlen, chunk):
        e = min(seqlen, s + chunk)
        args = (h, dt[:, :, s:e], dtu[:, :, s:e], Ac, Bc[:, :, s:e], Cc[:, :, s:e])
        if grad:
            from torch.utils.checkpoint import checkpoint

            y_c, h = checkpoint(_torch_chunk, *args, use_reentrant=False)
        else:
            y_c, h = _torch_chunk(*args)
        ys.append(y_c)
    y = torch.cat(ys, -1) if ys else torch.zeros(bsz, dim, 0, dtype=cd, device=u.device)
    return _finish(y, u, D, z, cd), h


def _scan_mambapy(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    pscan = _try_import("mambapy.pscan").pscan
    cd = _compute_dtype(u, delta, A, B, C, initial_state)
    dt = _discretised_dt(delta, delta_bias, delta_softplus, cd)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(cd)[:, None, :])  # (b, D, L, N)
    drive = (dt * u.to(cd)).unsqueeze(-1) * B.to(cd).transpose(1, 2).unsqueeze(1)
    if initial_state is not None:
        first = drive[:, :, :1] + decay[:, :, :1] * initial_state.to(cd).unsqueeze(2)
        drive = torch.cat([first, drive[:, :, 1:]], 2)
    hs = pscan(decay.transpose(1, 2), drive.transpose(1, 2))  # (b, L, D, N)
    y = (hs @ C.to(cd).transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
    return _finish(y, u, D, z, cd), hs[:, -1]


def _scan_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """``selective_scan_fn`` with its dtype contract met: delta, B, C, z in ``u``'s dtype; A, D, delta_bias float32."""
    fn = _try_import("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    dt = u.dtype
    return fn(
        u,
        delta.to(dt),
        A.float(),
        B.to(dt),
        C.to(dt),
        None if D is None else D.float(),
        None if z is None else z.to(dt),
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
        True,
    )


# --------------------------------------------------------------------------------------------------------------
# numba kernels (plain Python source here; jitted lazily by _numba_kernels())
# --------------------------------------------------------------------------------------------------------------

_FM_KERNEL = {"reassoc", "contract", "arcp", "nsz", "afn"}  # no nnan/ninf: inf/nan inputs stay well-defined
_FM_EXP = {"contract", "arcp", "nsz"}  # no reassoc: it would undo the Cody-Waite split of ln 2

# exp(x) = p(r) * 2**k, k = round(x / ln2), r = x - k*ln2 (two-part ln2), p = Taylor polynomial (Horner).
_F32 = np.float32
_E32 = dict(
    lo=_F32(-88.0),
    hi=_F32(88.72283935546875),
    l2e=_F32(1.4426950408889634),
    half=_F32(0.5),
    ln2hi=_F32(0.693145751953125),
    ln2lo=_F32(1.428606765330187e-06),
    c=[_F32(1.0 / math.factorial(i)) for i in range(8)],
)
_E64 = dict(
    lo=-710.0,
    hi=709.782712893384,
    l2e=1.4426950408889634,
    half=0.5,
    ln2hi=6.93147180369123816490e-01,
    ln2lo=1.90821492927058770002e-10,
    c=[1.0 / math.factorial(i) for i in range(14)],
)

_E32_LO, _E32_HI, _E32_L2E, _E32_HALF = _E32["lo"], _E32["hi"], _E32["l2e"], _E32["half"]
_E32_LN2HI, _E32_LN2LO = _E32["ln2hi"], _E32["ln2lo"]
(_E32_C0, _E32_C1, _E32_C2, _E32_C3, _E32_C4, _E32_C5, _E32_C6, _E32_C7) = _E32["c"]
_E64_LO, _E64_HI, _E64_L2E, _E64_HALF = _E64["lo"], _E64["hi"], _E64["l2e"], _E64["half"]
_E64_LN2HI, _E64_LN2LO = _E64["ln2hi"], _E64["ln2lo"]
(
    _E64_C0,
    _E64_C1,
    _E64_C2,
    _E64_C3,
    _E64_C4,
    _E64_C5,
    _E64_C6,
    _E64_C7,
    _E64_C8,
    _E64_C9,
    _E64_C10,
    _E64_C11,
    _E64_C12,
    _E64_C13,
) = _E64["c"]

_bits_to_float = None  # numba intrinsic (int32 -> float32, int64 -> float64 bit cast), set by _numba_kernels()


def _fexp(x):
    """Stub: the numba overload of this name evaluates exp(x) in x's float type (see _numba_kernels)."""
    return math.exp(x)


def _exp_f32(x):
    xc = x if x > _E32_LO else _E32_LO
    xc = xc if xc < _E32_HI else _E32_HI
    kf = np.floor(xc * _E32_L2E + _E32_HALF)
    r = (xc - kf * _E32_LN2HI) - kf * _E32_LN2LO
    p = (
        (((((_E32_C7 * r + _E32_C6) * r + _E32_C5) * r + _E32_C4) * r + _E32_C3) * r + _E32_C2) * r + _E32_C1
    ) * r + _E32_C0
    e = np.int32(np.int32(kf) + np.int32(127))
    ec = e if e < np.int32(254) else np.int32(254)
    res = p * _bits_to_float(np.int32(ec << np.int32(23)))
    res = res + res if e > ec else res
    res = res if e > np.int32(0) else _F32(0.0)
    return res if x == x else x


def _exp_f64(x):
    xc = x if x > _E64_LO else _E64_LO
    xc = xc if xc < _E64_HI else _E64_HI
    kf = np.floor(xc * _E64_L2E + _E64_HALF)
    r = (xc - kf * _E64_LN2HI) - kf * _E64_LN2LO
    p = (
        (
            (
                (
                    (
                        (
                            (
                                (
                                    ((((_E64_C13 * r + _E64_C12) * r + _E64_C11) * r + _E64_C10) * r + _E64_C9) * r
                                    + _E64_C8
                                )
                                * r
                                + _E64_C7
                            )
                            * r
                            + _E64_C6
                        )
                        * r
                        + _E64_C5
                    )
                    * r
                    + _E64_C4
                )
                * r
                + _E64_C3
            )
            * r
            + _E64_C2
        )
        * r
        + _E64_C1
    ) * r + _E64_C0
    e = np.int64(np.int64(kf) + np.int64(1023))
    ec = e if e < np.int64(2046) else np.int64(2046)
    res = p * _bits_to_float(np.int64(ec << np.int64(52)))
    res = res + res if e > ec else res
    res = res if e > np.int64(0) else 0.0
    return res if x == x else x


_LANES = 64  # channels per SIMD block (the last block of a layer is padded with inert lanes)

# Inside the kernels, channels are the innermost ("lane") axis of thread-local scratch arrays, in blocks of _LANES;
# every hot loop runs over the lanes of one block, which LLVM vectorises (a compile-time trip count of 64 is long
# enough not to be fully unrolled, and each hot loop writes few arrays, so the runtime alias checks stay cheap).
# The kernels read and write the (batch, D, L) / (batch, D, N) tensors directly and fuse the skip connection and
# the gate (and their derivatives); only the step size dt = softplus(delta + bias) (and softplus') is computed by
# torch, vectorised, outside.


def _scan_fwd_kernel(item0, item1, u, dt, A, B, C, Dv, z, h0, y, hlast, has_D, has_z, has_h0, one):
    """Forward for work items item0 <= item < item1 of batch * ceil(D / _LANES), item = (batch row, channel block).

    u, dt (the discretised step, softplus(delta + bias)), z, y: (b, D, L); A: (D, N); B, C: (b, N, L); Dv: (D,);
    h0, hlast: (b, D, N). Flags say which optional inputs are real (the others are empty dummies); ``one`` is 1
    in the compute type (numba would promote float32 arithmetic with Python float literals to float64)."""
    bsz, dim, seqlen = u.shape
    n_state = A.shape[1]
    nb = (dim + _LANES - 1) // _LANES
    zero = one - one
    for item in range(item0, item1):
        b = item // nb
        d0 = (item % nb) * _LANES
        w = min(_LANES, dim - d0)
        dtl = np.zeros((seqlen, _LANES), dtype=y.dtype)  # discretised dt, lanes = channels
        dtul = np.zeros((seqlen, _LANES), dtype=y.dtype)  # dt * u
        yl = np.zeros((seqlen, _LANES), dtype=y.dtype)  # sum_n h_t[n] C_t[n]
        al = np.zeros((n_state, _LANES), dtype=y.dtype)
        h = np.zeros(_LANES, dtype=y.dtype)
        for j in range(w):
            d = d0 + j
            for t in range(seqlen):
                dtv = dt[b, d, t]
                dtl[t, j] = dtv
                dtul[t, j] = dtv * u[b, d, t]
            for n in range(n_state):
                al[n, j] = A[d, n]
        for n in range(n_state):
            an = al[n]
            if has_h0:
                for j in range(w):
                    h[j] = h0[b, d0 + j, n]
            else:
                h[:] = 0
            for t in range(seqlen):
                bt = B[b, n, t]
                ct = C[b, n, t]
                for j in range(_LANES):
                    hv = _fexp(dtl[t, j] * an[j]) * h[j] + dtul[t, j] * bt
                    h[j] = hv
                    yl[t, j] += hv * ct
            for j in range(w):
                hlast[b, d0 + j, n] = h[j]
        for j in range(w):
            d = d0 + j
            dd = Dv[d] if has_D else zero
            for t in range(seqlen):
                yv = yl[t, j] + dd * u[b, d, t]
                if has_z:
                    zt = z[b, d, t]
                    y[b, d, t] = yv * zt / (one + _fexp(-zt))
                else:
                    y[b, d, t] = yv


def _scan_bwd_kernel(
    item0,
    item1,
    u,
    dt,
    A,
    B,
    C,
    Dv,
    z,
    h0,
    dout,
    dlast,
    has_D,
    has_z,
    has_h0,
    has_dlast,
    ngrp,
    one,
    du,
    ddt,
    dz,
    dh0,
    dA_part,
    dD_part,
    dB_part,
    dC_part,
):
    """Backward for work items item0 <= item < item1 of batch * ngrp, item = (batch row, group of channel blocks).

    Inputs as in _scan_fwd_kernel plus dout (b, D, L) and dlast (b, D, N). Writes du, ddt (w.r.t. the discretised
    dt), dz (b, D, L), dh0 (b, D, N) and the partial sums dA_part (b, D, N), dD_part (b, D) (summed over the batch
    by the caller) and dB_part, dC_part (b, ngrp, N, L), zero-initialised (summed over the groups by the caller).

    Per channel block and state n: recompute the states h_t into scratch, then G_t = dL/dh_t by the reverse-time
    recurrence G_t = exp(dt_{t+1} A) G_{t+1} + C_t dy_t (G_{L-1} includes dlast), then the element-wise terms."""
    bsz, dim, seqlen = u.shape
    n_state = A.shape[1]
    nb = (dim + _LANES - 1) // _LANES
    zero = one - one
    for item in range(item0, item1):
        b = item // ngrp
        grp = item % ngrp
        k0 = (grp * nb) // ngrp
        k1 = ((grp + 1) * nb) // ngrp
        # thread-local scratch, O(L * _LANES)
        dtl = np.zeros((seqlen, _LANES), dtype=du.dtype)  # discretised dt
        dtul = np.zeros((seqlen, _LANES), dtype=du.dtype)  # dt * u
        ul = np.zeros((seqlen, _LANES), dtype=du.dtype)
        dyl = np.zeros((seqlen, _LANES), dtype=du.dtype)  # dL/d(scan output) = dout * silu(z)
        zcl = np.zeros((seqlen, _LANES), dtype=du.dtype)  # dout * silu'(z)
        hs = np.zeros((seqlen + 1, _LANES), dtype=du.dtype)  # hs[t + 1] = h_t, hs[0] = h_{-1}
        decay = np.ones((seqlen + 1, _LANES), dtype=du.dtype)  # decay[t] = exp(dt_t A), decay[L] = 1
        gs = np.zeros((seqlen + 1, _LANES), dtype=du.dtype)  # gs[t] = G_t, gs[L] = dlast
        qs = np.zeros((seqlen, _LANES), dtype=du.dtype)  # G_t * decay_t * h_{t-1} = dL/d(dt_t A_n)
        yacc = np.zeros((seqlen, _LANES), dtype=du.dtype)  # sum_n h_t C_t
        qa = np.zeros((seqlen, _LANES), dtype=du.dtype)  # sum_n qs * A_n
        gb = np.zeros((seqlen, _LANES), dtype=du.dtype)  # sum_n G_t B_t
        al = np.zeros((n_state, _LANES), dtype=du.dtype)
        gA = np.zeros(_LANES, dtype=du.dtype)
        dBp = dB_part[b, grp]
        dCp = dC_part[b, grp]
        for k in range(k0, k1):
            d0 = k * _LANES
            w = min(_LANES, dim - d0)
            if w < _LANES:  # a partial block: clear what the previous block left in the padding lanes
                dtl[:, :] = 0
                dtul[:, :] = 0
                ul[:, :] = 0
                dyl[:, :] = 0
                zcl[:, :] = 0
                al[:, :] = 0
                hs[0, :] = 0
                gs[seqlen, :] = 0
            # load the block (padding lanes are zero: inert)
            for j in range(w):
                d = d0 + j
                for t in range(seqlen):
                    dtv = dt[b, d, t]
                    ut = u[b, d, t]
                    dtl[t, j] = dtv
                    ul[t, j] = ut
                    dtul[t, j] = dtv * ut
                    go = dout[b, d, t]
                    if has_z:
                        zt = z[b, d, t]
                        sg = one / (one + _fexp(-zt))
                        dyl[t, j] = go * zt * sg
                        zcl[t, j] = go * sg * (one + zt * (one - sg))
                    else:
                        dyl[t, j] = go
                for n in range(n_state):
                    al[n, j] = A[d, n]
            yacc[:, :] = 0
            qa[:, :] = 0
            gb[:, :] = 0
            for n in range(n_state):
                an = al[n]
                if has_h0:
                    for j in range(w):
                        hs[0, j] = h0[b, d0 + j, n]
                # recompute this state's trajectory
                for t in range(seqlen):
                    bt = B[b, n, t]
                    ct = C[b, n, t]
                    csum = zero
                    for j in range(_LANES):
                        a = _fexp(dtl[t, j] * an[j])
                        hv = a * hs[t, j] + dtul[t, j] * bt
                        decay[t, j] = a
                        hs[t + 1, j] = hv
                        yacc[t, j] += hv * ct
                        csum += dyl[t, j] * hv
                    dCp[n, t] += csum
                # reverse-time recurrence
                if has_dlast:
                    for j in range(w):
                        gs[seqlen, j] = dlast[b, d0 + j, n]
                for t in range(seqlen - 1, -1, -1):
                    ct = C[b, n, t]
                    for j in range(_LANES):
                        gs[t, j] = gs[t + 1, j] * decay[t + 1, j] + ct * dyl[t, j]
                # element-wise terms
                for t in range(seqlen):
                    for j in range(_LANES):
                        qs[t, j] = gs[t, j] * decay[t, j] * hs[t, j]
                gA[:] = 0
                for t in range(seqlen):
                    for j in range(_LANES):
                        q = qs[t, j]
                        qa[t, j] += q * an[j]
                        gA[j] += q * dtl[t, j]
                for t in range(seqlen):
                    bt = B[b, n, t]
                    bsum = zero
                    for j in range(_LANES):
                        gv = gs[t, j]
                        gb[t, j] += gv * bt
                        bsum += gv * dtul[t, j]
                    dBp[n, t] += bsum
                for j in range(w):
                    dh0[b, d0 + j, n] = gs[0, j] * decay[0, j]
                    dA_part[b, d0 + j, n] = gA[j]
            # chain rule to dt and u; skip connection and gate
            for j in range(w):
                d = d0 + j
                dd = Dv[d] if has_D else zero
                dD_acc = zero
                for t in range(seqlen):
                    ut = ul[t, j]
                    dyt = dyl[t, j]
                    dD_acc += dyt * ut
                    du[b, d, t] = gb[t, j] * dtl[t, j] + dyt * dd
                    ddt[b, d, t] = qa[t, j] + gb[t, j] * ut
                    if has_z:
                        dz[b, d, t] = zcl[t, j] * (yacc[t, j] + dd * ut)
                dD_part[b, d] = dD_acc


_KERNELS = None


def _cache_named(fn):
    """numba names its on-disk cache entries after the file and the function's qualname, but an entry also records
    the importing module's name and re-imports it on load; suffix the qualname with a hash of this module's name so
    the same file imported under two names (package module, a copy loaded by path) never loads the other's entry."""
    fn.__qualname__ = f"{fn.__name__}_{zlib.crc32(__name__.encode()) & 0xFFFFFFFF:08x}"
    return fn


def _numba_kernels():
    """Jit (or load from the on-disk cache) the numba kernels; returns (forward, backward)."""
    global _KERNELS, _bits_to_float
    with _LOCK:
        if _KERNELS is not None:
            return _KERNELS
        numba = _try_import("numba")
        if numba is None:
            raise RuntimeError("numba is not installed (pip install numba)")
        from numba.core import types
        from numba.extending import intrinsic, overload

        @intrinsic
        def bits_to_float(typingctx, x):
            if x == types.int32:
                sig = types.float32(types.int32)
            elif x == types.int64:
                sig = types.float64(types.int64)
            else:
                return None

            def codegen(context, builder, signature, args):
                return builder.bitcast(args[0], context.get_value_type(signature.return_type))

            return sig, codegen

        _bits_to_float = bits_to_float
        exp32 = numba.njit(fastmath=_FM_EXP, cache=True)(_cache_named(_exp_f32))
        exp64 = numba.njit(fastmath=_FM_EXP, cache=True)(_cache_named(_exp_f64))

        @overload(_fexp)
        def _ov_fexp(x):
            if x == types.float32:
                return lambda x: exp32(x)
            if x == types.float64:
                return lambda x: exp64(x)
            return None

        opts = dict(cache=True, fastmath=_FM_KERNEL, nogil=True)
        _KERNELS = (
            numba.njit(**opts)(_cache_named(_scan_fwd_kernel)),
            numba.njit(**opts)(_cache_named(_scan_bwd_kernel)),
        )
        return _KERNELS


_POOL = None
_POOL_PID = None


def _run_parallel(kernel, n_items, *args):
    """Run ``kernel(item0, item1, *args)`` over ``range(n_items)`` split into contiguous chunks, one per thread.

    The kernels are compiled with ``nogil=True`` and run on a plain thread pool (threads blocked on futures sleep),
    sized by ``torch.get_num_threads()``. This avoids numba's OpenMP threading layer: a second OpenMP runtime next
    to torch's, whose idle threads spin after each region and slow torch's ops (and ours) on a busy machine."""
    global _POOL, _POOL_PID
    nthreads = max(1, min(torch.get_num_threads(), n_items))
    if nthreads == 1:
        kernel(0, n_items, *args)
        return
    with _LOCK:
        if _POOL is None or _POOL_PID != os.getpid() or _POOL._max_workers < nthreads - 1:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(
                max_workers=max(nthreads - 1, os.cpu_count() or 1), thread_name_prefix="selective_scan"
            )
            _POOL_PID = os.getpid()
        pool = _POOL
    bounds = [(i * n_items) // nthreads for i in range(nthreads + 1)]
    futures = [pool.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, nthreads)]
    try:
        kernel(bounds[0], bounds[1], *args)
    finally:
        for f in futures:
            f.result()


def _n_groups(bsz, nb, nthreads):
    """Channel-block groups per batch row in the backward: enough work items to keep every thread busy, few
    enough to keep the (batch, groups, N, L) partial sums of dB and dC small."""
    return int(max(1, min(nb, -(-2 * nthreads // max(1, bsz)))))


def _one(cd):
    return np.float64(1.0) if cd == torch.float64 else np.float32(1.0)


def _np_in(t, cd, ndim):
    """A tensor as a contiguous numpy array in the compute dtype, or an empty dummy when it is None."""
    if t is None:
        return np.zeros((0,) * ndim, dtype=np.float64 if cd == torch.float64 else np.float32)
    return t.detach().to(cd).contiguous().numpy()


class SelectiveScanFunction(torch.autograd.Function):
    """Selective scan on CPU tensors (numba kernels) with an exact hand-written backward.

    ``apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus) -> (y, last_state)``; ``D``,
    ``z``, ``delta_bias``, ``initial_state`` may be None. ``y`` is in ``u``'s dtype, ``last_state`` in the compute
    dtype (float32, or float64 for float64 inputs); both are differentiable. Each direction is one parallel
    kernel launch over (batch row, channel block) work items; only the inputs are saved for the backward.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        fwd, _ = _numba_kernels()
        cd = _compute_dtype(u, delta, A, B, C, initial_state)
        bsz, dim, seqlen = u.shape
        n_state = A.shape[1]
        nb = -(-dim // _LANES)
        y = torch.empty(bsz, dim, seqlen, dtype=cd)
        hlast = torch.empty(bsz, dim, n_state, dtype=cd)
        with torch.no_grad():
            dt = _discretised_dt(delta.detach(), delta_bias, delta_softplus, cd)
        _run_parallel(
            fwd,
            bsz * nb,
            _np_in(u, cd, 3),
            _np_in(dt, cd, 3),
            _np_in(A, cd, 2),
            _np_in(B, cd, 3),
            _np_in(C, cd, 3),
            _np_in(D, cd, 1),
            _np_in(z, cd, 3),
            _np_in(initial_state, cd, 3),
            y.numpy(),
            hlast.numpy(),
            D is not None,
            z is not None,
            initial_state is not None,
            _one(cd),
        )
        del dt
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.set_materialize_grads(False)
        return y.to(u.dtype), hlast

    @staticmethod
    def backward(ctx, dout, dlast):
        _, bwd = _numba_kernels()
        u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
        cd = _compute_dtype(u, delta, A, B, C, initial_state)
        bsz, dim, seqlen = u.shape
        n_state = A.shape[1]
        ngrp = _n_groups(bsz, -(-dim // _LANES), max(1, torch.get_num_threads()))
        raw = delta.detach().to(cd)
        if delta_bias is not None:
            raw = raw + delta_bias.detach().to(cd)[:, None]
        dt = F.softplus(raw) if ctx.delta_softplus else raw
        du = torch.empty(bsz, dim, seqlen, dtype=cd)
        ddt = torch.empty(bsz, dim, seqlen, dtype=cd)
        dz = torch.empty(bsz, dim, seqlen, dtype=cd) if z is not None else None
        dh0 = torch.empty(bsz, dim, n_state, dtype=cd)
        dA_part = torch.empty(bsz, dim, n_state, dtype=cd)
        dD_part = torch.empty(bsz, dim, dtype=cd)
        dB_part = torch.zeros(bsz, ngrp, n_state, seqlen, dtype=cd)
        dC_part = torch.zeros(bsz, ngrp, n_state, seqlen, dtype=cd)
        if dout is None:
            dout = torch.zeros(bsz, dim, seqlen, dtype=cd)
        _run_parallel(
            bwd,
            bsz * ngrp,
            _np_in(u, cd, 3),
            _np_in(dt, cd, 3),
            _np_in(A, cd, 2),
            _np_in(B, cd, 3),
            _np_in(C, cd, 3),
            _np_in(D, cd, 1),
            _np_in(z, cd, 3),
            _np_in(initial_state, cd, 3),
            _np_in(dout, cd, 3),
            _np_in(dlast, cd, 3),
            D is not None,
            z is not None,
            initial_state is not None,
            dlast is not None,
            ngrp,
            _one(cd),
            du.numpy(),
            ddt.numpy(),
            dz.numpy() if dz is not None else _np_in(None, cd, 3),
            dh0.numpy(),
            dA_part.numpy(),
            dD_part.numpy(),
            dB_part.numpy(),
            dC_part.numpy(),
        )
        del dt
        if ctx.delta_softplus:  # softplus'(x) = sigmoid(x), exactly 1 above torch's threshold 20
            ddt.mul_(torch.where(raw > 20, 1.0, torch.sigmoid(raw)).to(cd))
        ddelta = ddt
        need = ctx.needs_input_grad

        def out(flag, t, like):
            return t.to(like.dtype) if (flag and like is not None) else None

        return (
            out(need[0], du, u),
            out(need[1], ddelta, delta),
            out(need[2], dA_part.sum(0), A),
            out(need[3], dB_part.sum(1) if ngrp > 1 else dB_part[:, 0], B),
            out(need[4], dC_part.sum(1) if ngrp > 1 else dC_part[:, 0], C),
            out(need[5], dD_part.sum(0), D),
            out(need[6], dz, z),
            out(need[7], ddelta.sum((0, 2)), delta_bias),
            out(need[8], dh0, initial_state),
            None,
        )


def _scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    return SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    initial_state=None,
    backend=None,
):
    """Selective scan with the semantics of transformers' ``mamba_selective_scan`` (see the module docstring).

    Args:
        u, delta, z: ``(batch, D, L)``. A: ``(D, N)``. B, C: ``(batch, N, L)``. D, delta_bias: ``(D,)``.
        initial_state: optional ``(batch, D, N)`` state ``h_{-1}`` (e.g. to continue a chunked prefill).
        backend: ``None``/``"auto"`` or a backend to force (see :func:`resolve_scan_backend`).

    Returns:
        ``y`` of shape ``(batch, D, L)`` in ``u``'s dtype, and, if ``return_last_state``, the final state
        ``(batch, D, N)`` in float32 (float64 for float64 inputs). Differentiable in every tensor input.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    name = resolve_scan_backend(u.device, backend, dtype=u.dtype, d_state=A.shape[1])
    if name == "mamba_ssm" and initial_state is not None:
        name = "torch"  # mamba_ssm's selective_scan_fn has no initial state
    if u.shape[2] == 0:
        name = "torch"
    if name == "numba":
        y, last = _scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    elif name == "mamba_ssm":
        y, last = _scan_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    elif name == "mambapy":
        y, last = _scan_mambapy(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    else:
        y, last = _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    if return_last_state:
        return y, last
    return y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend=None):
    """One decode step, as transformers' ``mamba_selective_state_update``; updates ``state`` in place.

    The backend follows the same policy as :func:`selective_scan` (``backend`` argument, environment variable,
    device, dtype): ``mamba_ssm``'s triton step on CUDA, else the torch step.

    Args:
        state: ``(batch, D, N)``, overwritten with the new state. x, dt, z: ``(batch, D)``. A: ``(D, N)``.
        B, C: ``(batch, N)``. D, dt_bias: ``(D,)``.

    Returns:
        ``y`` of shape ``(batch, D)`` in ``x``'s dtype.
    """
    name = resolve_scan_backend(state.device, backend, dtype=x.dtype, d_state=A.shape[1])
    if name == "mamba_ssm" and state.dtype in KERNEL_DTYPES:
        mod = _try_import("mamba_ssm.ops.triton.selective_state_update")
        if mod is not None:
            return mod.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
    cd = _compute_dtype(state, x, dt, A, B, C)
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    xc = x.to(cd)
    new = state.to(cd) * torch.exp(dt.unsqueeze(-1) * A.to(cd))
    new = torch.addcmul(new, (dt * xc).unsqueeze(-1), B.to(cd).unsqueeze(1))
    state.copy_(new)
    y = torch.bmm(new, C.to(cd).unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + xc * D.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype)
