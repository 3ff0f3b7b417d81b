"""Selective scan (Mamba-1 SSM recurrence) with a fast CPU kernel, the CUDA kernels, and a pure-torch fallback.

This file stands on its own: it is copied next to saved weights as Hugging Face remote code, so it imports only
``torch``, ``numpy`` and the standard library; ``numba``, ``mamba_ssm`` and ``mambapy`` are optional and imported
lazily, only when their backend is used.

Semantics (identical to ``transformers.models.mamba.modeling_mamba.mamba_selective_scan``)::

    dt_t  = softplus(delta_t + delta_bias)          (softplus only if delta_softplus)
    h_t   = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t        h_{-1} = initial_state or 0
    y_t   = <h_t, C_t> + D * u_t
    out_t = y_t * silu(z_t)                         (gate only if z is given)

with ``u, delta, z: (batch, D, L)``, ``A: (D, N)`` (already negative, ``-exp(A_log)``), ``B, C: (batch, N, L)``,
``D, delta_bias: (D,)``, states ``(batch, D, N)``.

Backends (:func:`resolve_scan_backend`), chosen by the tensors' device at *call* time:

* ``"numba"`` (alias ``"fast"``) -- CPU. :class:`SelectiveScanFunction`, a ``torch.autograd.Function`` with an
  exact hand-written backward. Channels are laid out in blocks of 64 SIMD lanes; the forward streams over time
  keeping the block's state for one state index ``n`` in a 64-wide buffer; the backward recomputes those states
  into an ``(L, 64)`` scratch buffer and runs the reverse-time recurrence
  ``G_t = exp(dt_{t+1} A) G_{t+1} + C_t dy_t`` (``G_t = dL/dh_t``), then the element-wise terms. Parallel over
  batch x channel blocks (``numba.prange``); it never materialises a ``(batch, D, L, N)`` tensor: memory is
  O(batch*D*L + batch*L*N) (the dB/dC partial sums are (batch, groups, N, L) with a few groups per batch row)
  plus O(L*64) scratch per work item. ``exp`` is a vectorisable Cody-Waite + Taylor polynomial (about 1 ulp;
  results below the smallest normal number flush to zero). float32 and float64 are supported (float64 inputs
  are computed in float64; float16/bfloat16 inputs in float32). Softplus, skip connection, gate and layout
  changes run as torch element-wise ops on (batch, D, L) tensors.
* ``"mamba_ssm"`` -- CUDA, when ``mamba_ssm`` is importable (its kernels accept any state size <= 256).
  A call with ``initial_state`` (not supported by that kernel) falls back to ``"torch"`` on the same device.
* ``"mambapy"`` -- ``mambapy``'s parallel scan (O(batch*D*L*N) memory), only when forced.
* ``"torch"`` -- pure torch, any device: a sequential scan in time chunks, each chunk recomputed in the backward
  (activation checkpointing), so its memory is O(batch*D*L + batch*D*N*L/chunk + batch*D*N*chunk).

``"auto"`` picks ``mamba_ssm`` on CUDA when importable, ``numba`` on CPU when importable, else ``torch``.
A backend is forced by the ``backend`` argument (e.g. from the model config's ``scan_backend``) or by the
environment variable ``HF_COMPRESSSSM_SCAN_BACKEND`` (``auto``, ``fast``/``numba``, ``torch``, ``mambapy``,
``mamba_ssm``), which overrides the argument when set to anything but ``auto``. A forced backend that cannot run
(not installed, or the wrong device) raises a ``RuntimeError``.

JIT warm-up: the numba kernels compile on their first use in a process -- about 15 s per dtype (float32,
float64) for the forward and backward kernels together on a 2-core machine -- and are cached on disk
(``cache=True``: in ``__pycache__`` next to this file, or under ``NUMBA_CACHE_DIR``); later processes load them in
about half a second. Importing this module does not import numba.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import threading
import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ENV_VAR",
    "BACKENDS",
    "SelectiveScanFunction",
    "available_backends",
    "resolve_scan_backend",
    "selective_scan",
    "selective_state_update",
]

ENV_VAR = "HF_COMPRESSSSM_SCAN_BACKEND"
BACKENDS = ("numba", "mamba_ssm", "mambapy", "torch")
_ALIASES = {"auto": "auto", "": "auto", "fast": "numba", "numba": "numba", "torch": "torch", "mambapy": "mambapy",
            "mamba_ssm": "mamba_ssm", "mamba-ssm": "mamba_ssm"}

# --------------------------------------------------------------------------------------------------------------
# optional dependencies, imported lazily and at most once
# --------------------------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_IMPORTS: dict = {}


def _try_import(name):
    """Import ``name`` once; return the module or None (remembering the failure)."""
    with _LOCK:
        if name not in _IMPORTS:
            mod = None
            if importlib.util.find_spec(name.split(".")[0]) is not None:
                try:
                    mod = importlib.import_module(name)
                except Exception as exc:  # a broken install counts as unavailable
                    warnings.warn(f"selective_scan: importing {name} failed ({exc!r}); backend unavailable")
            _IMPORTS[name] = mod
        return _IMPORTS[name]


def _numba_importable():
    return _try_import("numba") is not None


def _mambapy_importable():
    return _try_import("mambapy.pscan") is not None


def _mamba_ssm_importable():
    return _try_import("mamba_ssm.ops.selective_scan_interface") is not None


def _device_type(device):
    if isinstance(device, torch.Tensor):
        device = device.device
    if device is None:
        return "cpu"
    return torch.device(device).type


def available_backends(device=None) -> list[str]:
    """Backends that can run here (on ``device`` if given, else on any device), fastest first."""
    dtype = None if device is None else _device_type(device)
    out = []
    if (dtype in (None, "cpu")) and _numba_importable():
        out.append("numba")
    if (dtype in (None, "cuda")) and _mamba_ssm_importable():
        out.append("mamba_ssm")
    if _mambapy_importable():
        out.append("mambapy")
    out.append("torch")
    return out


def _normalise(name):
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown selective-scan backend {name!r}; expected one of auto, fast, numba, torch, mambapy, mamba_ssm"
        )
    return _ALIASES[key]


def resolve_scan_backend(device, requested=None) -> str:
    """Name of the backend that runs a scan on ``device`` (a ``torch.device``, string, or tensor).

    ``requested`` (e.g. a config's ``scan_backend``) forces a backend unless it is ``None``/``"auto"``; the
    environment variable ``HF_COMPRESSSSM_SCAN_BACKEND``, when set to anything but ``auto``, overrides it.
    ``"auto"``: ``mamba_ssm`` on CUDA if importable, ``numba`` on CPU if importable, else ``torch``.
    Raises ``RuntimeError`` when a forced backend cannot run on ``device``; ``ValueError`` for an unknown name.
    """
    dev = _device_type(device)
    env = os.environ.get(ENV_VAR, "")
    choice = _normalise(env) if env.strip() else "auto"
    source = f"environment variable {ENV_VAR}={env!r}"
    if choice == "auto":
        choice = _normalise(requested) if requested is not None else "auto"
        source = f"backend={requested!r}"
    if choice == "auto":
        if dev == "cuda" and _mamba_ssm_importable():
            return "mamba_ssm"
        if dev == "cpu" and _numba_importable():
            return "numba"
        return "torch"
    if choice == "numba":
        if dev != "cpu":
            raise RuntimeError(f"selective scan: {source} forces the numba kernel, which runs on CPU tensors only "
                               f"(got device {dev!r}); use 'auto', 'torch' or 'mamba_ssm'")
        if not _numba_importable():
            raise RuntimeError(f"selective scan: {source} forces the numba kernel but numba is not installed "
                               "(pip install numba), or unset it / use 'auto' or 'torch'")
    elif choice == "mamba_ssm":
        if dev != "cuda":
            raise RuntimeError(f"selective scan: {source} forces mamba_ssm, which runs on CUDA tensors only "
                               f"(got device {dev!r})")
        if not _mamba_ssm_importable():
            raise RuntimeError(f"selective scan: {source} forces mamba_ssm but it is not importable "
                               "(pip install mamba-ssm --no-build-isolation, with a CUDA torch)")
    elif choice == "mambapy":
        if not _mambapy_importable():
            raise RuntimeError(f"selective scan: {source} forces mambapy but it is not installed (pip install mambapy)")
    return choice


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
    fn = _try_import("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)


# --------------------------------------------------------------------------------------------------------------
# numba kernels (plain Python source here; jitted lazily by _numba_kernels())
# --------------------------------------------------------------------------------------------------------------

_FM_KERNEL = {"reassoc", "contract", "arcp", "nsz", "afn"}  # no nnan/ninf: inf/nan inputs stay well-defined
_FM_EXP = {"contract", "arcp", "nsz"}  # no reassoc: it would undo the Cody-Waite split of ln 2

# exp(x) = p(r) * 2**k, k = round(x / ln2), r = x - k*ln2 (two-part ln2), p = Taylor polynomial (Horner).
_F32 = np.float32
_E32 = dict(lo=_F32(-88.0), hi=_F32(88.72283935546875), l2e=_F32(1.4426950408889634), half=_F32(0.5),
            ln2hi=_F32(0.693145751953125), ln2lo=_F32(1.428606765330187e-06),
            c=[_F32(1.0 / math.factorial(i)) for i in range(8)])
_E64 = dict(lo=-710.0, hi=709.782712893384, l2e=1.4426950408889634, half=0.5,
            ln2hi=6.93147180369123816490e-01, ln2lo=1.90821492927058770002e-10,
            c=[1.0 / math.factorial(i) for i in range(14)])

_E32_LO, _E32_HI, _E32_L2E, _E32_HALF = _E32["lo"], _E32["hi"], _E32["l2e"], _E32["half"]
_E32_LN2HI, _E32_LN2LO = _E32["ln2hi"], _E32["ln2lo"]
(_E32_C0, _E32_C1, _E32_C2, _E32_C3, _E32_C4, _E32_C5, _E32_C6, _E32_C7) = _E32["c"]
_E64_LO, _E64_HI, _E64_L2E, _E64_HALF = _E64["lo"], _E64["hi"], _E64["l2e"], _E64["half"]
_E64_LN2HI, _E64_LN2LO = _E64["ln2hi"], _E64["ln2lo"]
(_E64_C0, _E64_C1, _E64_C2, _E64_C3, _E64_C4, _E64_C5, _E64_C6, _E64_C7, _E64_C8, _E64_C9, _E64_C10, _E64_C11,
 _E64_C12, _E64_C13) = _E64["c"]

_bits_to_float = None  # numba intrinsic (int32 -> float32, int64 -> float64 bit cast), set by _numba_kernels()


def _fexp(x):
    """Stub: the numba overload of this name evaluates exp(x) in x's float type (see _numba_kernels)."""
    return math.exp(x)


def _exp_f32(x):
    xc = x if x > _E32_LO else _E32_LO
    xc = xc if xc < _E32_HI else _E32_HI
    kf = np.floor(xc * _E32_L2E + _E32_HALF)
    r = (xc - kf * _E32_LN2HI) - kf * _E32_LN2LO
    p = ((((((_E32_C7 * r + _E32_C6) * r + _E32_C5) * r + _E32_C4) * r + _E32_C3) * r + _E32_C2) * r
         + _E32_C1) * r + _E32_C0
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
    p = ((((((((((((_E64_C13 * r + _E64_C12) * r + _E64_C11) * r + _E64_C10) * r + _E64_C9) * r + _E64_C8) * r
                 + _E64_C7) * r + _E64_C6) * r + _E64_C5) * r + _E64_C4) * r + _E64_C3) * r + _E64_C2) * r
         + _E64_C1) * r + _E64_C0
    e = np.int64(np.int64(kf) + np.int64(1023))
    ec = e if e < np.int64(2046) else np.int64(2046)
    res = p * _bits_to_float(np.int64(ec << np.int64(52)))
    res = res + res if e > ec else res
    res = res if e > np.int64(0) else 0.0
    return res if x == x else x


_LANES = 64  # channels per SIMD block (D is padded with inert channels to a multiple of this)

# Kernel layout: channels are the innermost ("lane") axis, blocks of _LANES of them; every hot loop runs over
# the lanes of one block, which LLVM vectorises (a compile-time trip count of 64 is long enough that it is not
# fully unrolled, and each hot loop writes few arrays, so the runtime alias checks stay cheap).


def _scan_fwd_kernel(dt, dtu, A, B, C, h0, ys, hlast, has_h0):
    """Core scan. dt, dtu (= dt * u), ys: (b, nb, L, W); A: (nb, N, W); B, C: (b, N, L);
    h0, hlast: (b, nb, N, W), W = _LANES. ys = sum_n h_t[n] C_t[n], h_t = exp(dt_t A) h_{t-1} + dtu_t B_t,
    h_{-1} = h0 (or 0)."""
    bsz, nb, seqlen, _ = dt.shape
    n_state = A.shape[1]
    for item in _prange(bsz * nb):
        b = item // nb
        k = item % nb
        h = np.empty(_LANES, dtype=ys.dtype)
        y = ys[b, k]
        y[:, :] = 0
        dtk = dt[b, k]
        dtuk = dtu[b, k]
        for n in range(n_state):
            an = A[k, n]
            if has_h0:
                for j in range(_LANES):
                    h[j] = h0[b, k, n, j]
            else:
                h[:] = 0
            for t in range(seqlen):
                bt = B[b, n, t]
                ct = C[b, n, t]
                for j in range(_LANES):
                    hv = _fexp(dtk[t, j] * an[j]) * h[j] + dtuk[t, j] * bt
                    h[j] = hv
                    y[t, j] += hv * ct
            for j in range(_LANES):
                hlast[b, k, n, j] = h[j]


def _scan_bwd_kernel(dt, dtu, u, A, B, C, h0, Dv, dy, zc, dlast, has_h0, has_D, has_z, has_dlast, ngrp,
                     du, ddt, dz, dh0, dA_part, dD_part, dB_part, dC_part):
    """Backward of the core scan plus the skip (D) and gate terms.

    dt, dtu, u, dy (= dout * silu(z), or dout), zc (= dout * silu'(z)), du, ddt, dz: (b, nb, L, W);
    A: (nb, N, W); B, C: (b, N, L); h0, dlast, dh0, dA_part: (b, nb, N, W); Dv: (nb, W); dD_part: (b, nb, W);
    dB_part, dC_part: (b, ngrp, N, L) zero-initialised partial sums, one per group of channel blocks.
    ddt is the gradient w.r.t. the discretised dt; dz = zc * (ys + D u).

    Per (block, state n): recompute the states h_t into scratch, then G_t = dL/dh_t by the reverse-time
    recurrence G_t = exp(dt_{t+1} A) G_{t+1} + C_t dy_t (G_{L-1} includes dlast), then the element-wise terms."""
    bsz, nb, seqlen, _ = dt.shape
    n_state = A.shape[1]
    for item in _prange(bsz * ngrp):
        b = item // ngrp
        grp = item % ngrp
        k0 = (grp * nb) // ngrp
        k1 = ((grp + 1) * nb) // ngrp
        # thread-local scratch, O(L * W)
        hs = np.empty((seqlen + 1, _LANES), dtype=du.dtype)  # hs[t + 1] = h_t, hs[0] = h_{-1}
        decay = np.empty((seqlen + 1, _LANES), dtype=du.dtype)  # decay[t] = exp(dt_t A), decay[L] = 1
        gs = np.empty((seqlen + 1, _LANES), dtype=du.dtype)  # gs[t] = G_t, gs[L] = dlast
        qs = np.empty((seqlen, _LANES), dtype=du.dtype)  # G_t * decay_t * h_{t-1} = dL/d(dt_t A)
        yacc = np.empty((seqlen, _LANES), dtype=du.dtype)  # sum_n h_t C_t  (the scan output)
        qa = np.empty((seqlen, _LANES), dtype=du.dtype)  # sum_n qs * A_n
        gb = np.empty((seqlen, _LANES), dtype=du.dtype)  # sum_n G_t B_t
        gA = np.empty(_LANES, dtype=du.dtype)
        dDk = np.empty(_LANES, dtype=du.dtype)
        dBp = dB_part[b, grp]
        dCp = dC_part[b, grp]
        decay[seqlen, :] = 1
        for k in range(k0, k1):
            dtk = dt[b, k]
            dtuk = dtu[b, k]
            uk = u[b, k]
            dyk = dy[b, k]
            yacc[:, :] = 0
            qa[:, :] = 0
            gb[:, :] = 0
            for n in range(n_state):
                an = A[k, n]
                if has_h0:
                    for j in range(_LANES):
                        hs[0, j] = h0[b, k, n, j]
                else:
                    hs[0, :] = 0
                # recompute this state's trajectory
                for t in range(seqlen):
                    bt = B[b, n, t]
                    ct = C[b, n, t]
                    csum = bt - bt
                    for j in range(_LANES):
                        a = _fexp(dtk[t, j] * an[j])
                        hv = a * hs[t, j] + dtuk[t, j] * bt
                        decay[t, j] = a
                        hs[t + 1, j] = hv
                        yacc[t, j] += hv * ct
                        csum += dyk[t, j] * hv
                    dCp[n, t] += csum
                # reverse-time recurrence
                if has_dlast:
                    for j in range(_LANES):
                        gs[seqlen, j] = dlast[b, k, n, j]
                else:
                    gs[seqlen, :] = 0
                for t in range(seqlen - 1, -1, -1):
                    ct = C[b, n, t]
                    for j in range(_LANES):
                        gs[t, j] = gs[t + 1, j] * decay[t + 1, j] + ct * dyk[t, j]
                # element-wise terms
                for t in range(seqlen):
                    for j in range(_LANES):
                        qs[t, j] = gs[t, j] * decay[t, j] * hs[t, j]
                gA[:] = 0
                for t in range(seqlen):
                    for j in range(_LANES):
                        q = qs[t, j]
                        qa[t, j] += q * an[j]
                        gA[j] += q * dtk[t, j]
                for t in range(seqlen):
                    bt = B[b, n, t]
                    bsum = bt - bt
                    for j in range(_LANES):
                        gv = gs[t, j]
                        gb[t, j] += gv * bt
                        bsum += gv * dtuk[t, j]
                    dBp[n, t] += bsum
                for j in range(_LANES):
                    dh0[b, k, n, j] = gs[0, j] * decay[0, j]
                    dA_part[b, k, n, j] = gA[j]
            # chain rule to dt and u, skip connection and gate
            dDk[:] = 0
            for t in range(seqlen):
                for j in range(_LANES):
                    dDk[j] += dyk[t, j] * uk[t, j]
            for t in range(seqlen):
                for j in range(_LANES):
                    ddt[b, k, t, j] = qa[t, j] + gb[t, j] * uk[t, j]
            if has_D:
                for t in range(seqlen):
                    for j in range(_LANES):
                        du[b, k, t, j] = gb[t, j] * dtk[t, j] + dyk[t, j] * Dv[k, j]
                        yacc[t, j] += Dv[k, j] * uk[t, j]
            else:
                for t in range(seqlen):
                    for j in range(_LANES):
                        du[b, k, t, j] = gb[t, j] * dtk[t, j]
            if has_z:
                for t in range(seqlen):
                    for j in range(_LANES):
                        dz[b, k, t, j] = zc[b, k, t, j] * yacc[t, j]
            for j in range(_LANES):
                dD_part[b, k, j] = dDk[j]


_prange = range  # replaced by numba.prange before jitting
_KERNELS = None


def _cache_named(fn):
    """numba names its on-disk cache entries after the file and the function's qualname, but an entry also records
    the importing module's name and re-imports it on load; suffix the qualname with a hash of this module's name so
    the same file imported under two names (package module, a copy loaded by path) never loads the other's entry."""
    fn.__qualname__ = f"{fn.__name__}_{zlib.crc32(__name__.encode()) & 0xFFFFFFFF:08x}"
    return fn


def _numba_kernels():
    """Jit (or load from the on-disk cache) the numba kernels; returns (forward, backward)."""
    global _KERNELS, _bits_to_float, _prange
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

        _prange = numba.prange
        opts = dict(parallel=True, cache=True, fastmath=_FM_KERNEL, nogil=True)
        _KERNELS = (numba.njit(**opts)(_cache_named(_scan_fwd_kernel)),
                    numba.njit(**opts)(_cache_named(_scan_bwd_kernel)))
        return _KERNELS


def _num_threads():
    numba = _try_import("numba")
    nt = max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads()))
    numba.set_num_threads(nt)
    return nt


def _n_groups(bsz, nb, nthreads):
    """Channel-block groups per batch row in the backward: enough work items to keep every thread busy, few
    enough to keep the (batch, groups, N, L) partial sums of dB and dC small."""
    return int(max(1, min(nb, -(-2 * nthreads // max(1, bsz)))))


def _dummy(cd, ndim):
    return np.zeros((0,) * ndim, dtype=np.float64 if cd == torch.float64 else np.float32)


def _to_lanes(x, dim_pad):
    """(b, D, L) -> contiguous (b, Dp / W, L, W), channels zero-padded to Dp (W = _LANES)."""
    bsz, dim, seqlen = x.shape
    if dim_pad != dim:
        x = torch.cat([x, x.new_zeros(bsz, dim_pad - dim, seqlen)], 1)
    return x.reshape(bsz, dim_pad // _LANES, _LANES, seqlen).transpose(2, 3).contiguous()


def _from_lanes(x, dim):
    """(b, nb, L, W) -> (b, D, L)."""
    bsz, nb, seqlen, _ = x.shape
    return x.transpose(2, 3).reshape(bsz, nb * _LANES, seqlen)[:, :dim]


def _state_to_lanes(h, dim_pad):
    """(b, D, N) -> contiguous (b, Dp / W, N, W)."""
    bsz, dim, n = h.shape
    if dim_pad != dim:
        h = torch.cat([h, h.new_zeros(bsz, dim_pad - dim, n)], 1)
    return h.reshape(bsz, dim_pad // _LANES, _LANES, n).transpose(2, 3).contiguous()


def _state_from_lanes(h, dim):
    bsz, nb, n, _ = h.shape
    return h.transpose(2, 3).reshape(bsz, nb * _LANES, n)[:, :dim]


def _softplus_grad(raw):
    # derivative of F.softplus(beta=1, threshold=20)
    return torch.where(raw > 20, torch.ones_like(raw), torch.sigmoid(raw))


class SelectiveScanFunction(torch.autograd.Function):
    """Selective scan on CPU tensors (numba kernels) with an exact hand-written backward.

    ``apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus) -> (y, last_state)``; ``D``,
    ``z``, ``delta_bias``, ``initial_state`` may be None. ``last_state`` is in the compute dtype (float32, or
    float64 for float64 inputs) and is differentiable too. Element-wise parts (softplus, skip, gate, layout
    changes) run in torch on (batch, D, L) tensors; the kernels run the recurrence and its reverse-time adjoint.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        fwd, _ = _numba_kernels()
        _num_threads()
        cd = _compute_dtype(u, delta, A, B, C, initial_state)
        bsz, dim, seqlen = u.shape
        n_state = A.shape[1]
        dim_pad = -(-dim // _LANES) * _LANES
        nb = dim_pad // _LANES
        with torch.no_grad():
            uc = u.detach().to(cd)
            dt = _discretised_dt(delta.detach(), delta_bias, delta_softplus, cd)
            ys = torch.empty(bsz, nb, seqlen, _LANES, dtype=cd)
            hlast = torch.empty(bsz, nb, n_state, _LANES, dtype=cd)
            A_l = _state_to_lanes(A.detach().to(cd)[None], dim_pad)[0]
            fwd(_to_lanes(dt, dim_pad).numpy(), _to_lanes(dt * uc, dim_pad).numpy(), A_l.numpy(),
                B.detach().to(cd).contiguous().numpy(), C.detach().to(cd).contiguous().numpy(),
                _state_to_lanes(initial_state.detach().to(cd), dim_pad).numpy()
                if initial_state is not None else _dummy(cd, 4),
                ys.numpy(), hlast.numpy(), initial_state is not None)
            y = _finish(_from_lanes(ys, dim), u.detach(), D, z, cd)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.delta_softplus = bool(delta_softplus)
        ctx.set_materialize_grads(False)
        return y, _state_from_lanes(hlast, dim).contiguous()

    @staticmethod
    def backward(ctx, dout, dlast):
        _, bwd = _numba_kernels()
        nthreads = _num_threads()
        u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
        cd = _compute_dtype(u, delta, A, B, C, initial_state)
        bsz, dim, seqlen = u.shape
        n_state = A.shape[1]
        dim_pad = -(-dim // _LANES) * _LANES
        nb = dim_pad // _LANES
        ngrp = _n_groups(bsz, nb, nthreads)
        uc = u.detach().to(cd)
        raw = delta.detach().to(cd)
        if delta_bias is not None:
            raw = raw + delta_bias.detach().to(cd)[:, None]
        dt = F.softplus(raw) if ctx.delta_softplus else raw
        dout = dout.to(cd) if dout is not None else torch.zeros(bsz, dim, seqlen, dtype=cd)
        if z is not None:
            zf = z.detach().to(cd)
            sig = torch.sigmoid(zf)
            dy = dout * zf * sig
            zcoef = _to_lanes(dout * sig * (1 + zf * (1 - sig)), dim_pad)
            del sig, zf
        else:
            dy = dout
            zcoef = None
        du = torch.empty(bsz, nb, seqlen, _LANES, dtype=cd)
        ddt = torch.empty(bsz, nb, seqlen, _LANES, dtype=cd)
        dz = torch.empty(bsz, nb, seqlen, _LANES, dtype=cd) if z is not None else None
        dh0 = torch.empty(bsz, nb, n_state, _LANES, dtype=cd)
        dA_part = torch.empty(bsz, nb, n_state, _LANES, dtype=cd)
        dD_part = torch.empty(bsz, nb, _LANES, dtype=cd)
        dB_part = torch.zeros(bsz, ngrp, n_state, seqlen, dtype=cd)
        dC_part = torch.zeros(bsz, ngrp, n_state, seqlen, dtype=cd)
        D_l = None
        if D is not None:
            D_l = torch.cat([D.detach().to(cd), D.new_zeros(dim_pad - dim, dtype=cd)]).reshape(nb, _LANES)
        bwd(_to_lanes(dt, dim_pad).numpy(), _to_lanes(dt * uc, dim_pad).numpy(), _to_lanes(uc, dim_pad).numpy(),
            _state_to_lanes(A.detach().to(cd)[None], dim_pad)[0].numpy(),
            B.detach().to(cd).contiguous().numpy(), C.detach().to(cd).contiguous().numpy(),
            _state_to_lanes(initial_state.detach().to(cd), dim_pad).numpy()
            if initial_state is not None else _dummy(cd, 4),
            D_l.contiguous().numpy() if D_l is not None else _dummy(cd, 2),
            _to_lanes(dy, dim_pad).numpy(), zcoef.numpy() if zcoef is not None else _dummy(cd, 4),
            _state_to_lanes(dlast.to(cd), dim_pad).numpy() if dlast is not None else _dummy(cd, 4),
            initial_state is not None, D is not None, z is not None, dlast is not None, ngrp,
            du.numpy(), ddt.numpy(), dz.numpy() if dz is not None else _dummy(cd, 4), dh0.numpy(),
            dA_part.numpy(), dD_part.numpy(), dB_part.numpy(), dC_part.numpy())
        ddt = _from_lanes(ddt, dim)
        ddelta = ddt * _softplus_grad(raw) if ctx.delta_softplus else ddt
        need = ctx.needs_input_grad

        def out(flag, t, like):
            return t.to(like.dtype).contiguous() if (flag and like is not None) else None

        return (
            out(need[0], _from_lanes(du, dim), u),
            out(need[1], ddelta, delta),
            out(need[2], _state_from_lanes(dA_part.sum(0, keepdim=True), dim)[0], A),
            out(need[3], dB_part.sum(1), B),
            out(need[4], dC_part.sum(1), C),
            out(need[5], dD_part.sum(0).reshape(-1)[:dim], D),
            out(need[6], _from_lanes(dz, dim) if dz is not None else None, z),
            out(need[7], ddelta.sum((0, 2)), delta_bias),
            out(need[8], _state_from_lanes(dh0, dim), initial_state),
            None,
        )


def _scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    return SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus)


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, backend=None):
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
    name = resolve_scan_backend(u.device, backend)
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

    Args:
        state: ``(batch, D, N)``, overwritten with the new state. x, dt, z: ``(batch, D)``. A: ``(D, N)``.
        B, C: ``(batch, N)``. D, dt_bias: ``(D,)``.

    Returns:
        ``y`` of shape ``(batch, D)`` in ``x``'s dtype.
    """
    if backend is not None or os.environ.get(ENV_VAR, "").strip():
        name = resolve_scan_backend(state.device, backend)
    else:
        name = "mamba_ssm" if state.device.type == "cuda" and _mamba_ssm_importable() else "torch"
    if name == "mamba_ssm":
        mod = _try_import("mamba_ssm.ops.triton.selective_state_update")
        if mod is not None:
            return mod.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                              dt_softplus=dt_softplus)
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
