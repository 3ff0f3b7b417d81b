"""The Mamba-2 (SSD) scan on CPU tensors: numba kernels, sequential in time, with an exact hand-written backward.

Recurrence per batch row b and head h (group ``g = h // (H / G)``), with the state ``s`` of shape (P, N) and the
step size ``Δ`` already discretised (``softplus(dt + dt_bias)`` clamped to ``dt_limit``, done by torch outside, so
autograd differentiates it)::

    s_t = exp(Δ_t A_h) s_{t-1} + Δ_t x_t ⊗ B_t[g]          s_{-1} = initial state or 0
    y_t = s_t C_t[g] + D_h x_t

Forward: one work item per (batch row, head) streams over time keeping only its (N, P) state (P, the head
dimension, is the vectorised inner axis, so any N works, 1 and odd included). The state is kept scaled,
``s_t = sig_t * r_t`` with ``sig_t`` the running product of the decays ``exp(Δ A)``: then ``r_t = r_{t-1} +
(Δ_t / sig_t) x_t ⊗ B_t`` is one multiply-add per element and step (instead of a multiply and a multiply-add), and
the decay is folded into ``r`` only when ``sig`` leaves [2^-20, 2^20] (also when it is 0, inf or nan), so ``r``
never loses range. When a gradient will be asked, the forward also stores the state entering every ``K``-th step
(``K`` as below): the backward's checkpoints.

Backward: per (batch row, head), segment by segment from the end, the segment's ``K + 1`` states are recomputed
from its checkpoint into scratch (``K`` so that they take about `SEGMENT_BYTES`, a core's cache, and at least N so
that the checkpoints take at most the bytes of x), and the gradient of the state ``G_t = dL/ds_t`` runs backwards,
``G_t = exp(Δ_{t+1} A_h) G_{t+1} + dy_t ⊗ C_t`` (``G_{L-1}`` includes the final state's gradient), scaled like the
state, giving every input's gradient exactly. Memory: the inputs, the outputs, the checkpoints and (b, splits, L, G,
N) partial sums of dB and dC, plus O(K P N) scratch per thread; no (b, H, chunks, chunk, chunk) or (b, L, H, P, N)
tensor. The work items run on `selective_scan`'s thread pool, sized by ``torch.get_num_threads()``. float64 inputs
are computed in float64, everything else in float32.

This file is copied next to saved weights as remote code: it imports torch, numpy and its sibling files; numba is
imported lazily (``kernel_policy._try_import``), only when the kernels are first used, and they compile on that
first use in a process (cached on disk, ``cache=True``).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from .kernel_policy import _LOCK, _try_import
from .selective_scan import _compute_dtype, _np_in, _one, _run_parallel
from .ssd_scan import discretised_step


__all__ = ["SSDScanFunction", "ssd_numba_scan"]

#: bytes of one segment's recomputed states (K + 1 states of P × N) in the backward: about one core's L2 cache.
SEGMENT_BYTES = 1 << 20

#: the backward's checkpoints take at most this many times the bytes of x (per batch row and head).
CHECKPOINT_RATIO = 1

_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}  # no nnan/ninf: inf/nan inputs stay well-defined

#: a running decay product stays factored out of the state while it lies in [_LOW, 1 / _LOW] (2^-20).
_LOW = 2.0**-20

# --------------------------------------------------------------------------------------------------------------
# numba kernels (plain Python source; jitted lazily by _numba_kernels())
# --------------------------------------------------------------------------------------------------------------


def _ssd_fwd_kernel(
    item0, item1, x, dt, A, Bm, Cm, Dv, h0, y, hlast, ck, has_D, has_h0, has_ck, seg, heads_per_group, one
):
    """Forward for work items item0 <= item < item1 of b * H, item = (batch row, head).

    x, y: (b, L, H, P); dt: (b, L, H) discretised; A, Dv: (H,); Bm, Cm: (b, L, G, N); h0, hlast: (b, H, P, N);
    ck: (b, H, ceil(L / seg), N, P), written with the state entering every ``seg``-th step when ``has_ck``.
    ``has_*`` say which optional inputs are real (the others are empty dummies); ``one`` is 1 in the compute type.
    The state is kept as ``s_t = sig_t * r_t`` (see the module docstring): one multiply-add per element and step."""
    _, seqlen, heads, hd = x.shape
    nst = Bm.shape[3]
    zero = one - one
    lo = one * _LOW  # the decay product stays factored out while in [lo, hi]; also False for 0, inf, nan
    hi = one / lo
    r = np.zeros((nst, hd), dtype=y.dtype)  # the scaled state, transposed: lanes = head channels
    xdt = np.zeros(hd, dtype=y.dtype)
    acc = np.zeros(hd, dtype=y.dtype)
    for item in range(item0, item1):
        b = item // heads
        h = item % heads
        g = h // heads_per_group
        ah = A[h]
        dd = Dv[h] if has_D else zero
        for n in range(nst):
            for p in range(hd):
                r[n, p] = h0[b, h, p, n] if has_h0 else zero
        sig = one
        for t in range(seqlen):
            if has_ck and t % seg == 0:  # the state entering step t, unscaled, for the backward
                ckt = ck[b, h, t // seg]
                for n in range(nst):
                    for p in range(hd):
                        v = r[n, p] * sig
                        r[n, p] = v
                        ckt[n, p] = v
                sig = one
            dtv = dt[b, t, h]
            sig = sig * math.exp(dtv * ah)
            if not (sig >= lo and sig <= hi):
                for n in range(nst):
                    for p in range(hd):
                        r[n, p] *= sig
                sig = one
            inv = one / sig
            for p in range(hd):
                xdt[p] = dtv * x[b, t, h, p] * inv
                acc[p] = zero
            n4 = 0
            while n4 + 4 <= nst:  # four state rows per pass over the lanes: acc is loaded and stored once
                b0, b1, b2, b3 = Bm[b, t, g, n4], Bm[b, t, g, n4 + 1], Bm[b, t, g, n4 + 2], Bm[b, t, g, n4 + 3]
                c0, c1, c2, c3 = Cm[b, t, g, n4], Cm[b, t, g, n4 + 1], Cm[b, t, g, n4 + 2], Cm[b, t, g, n4 + 3]
                r0, r1, r2, r3 = r[n4], r[n4 + 1], r[n4 + 2], r[n4 + 3]
                for p in range(hd):
                    xv = xdt[p]
                    v0 = r0[p] + b0 * xv
                    v1 = r1[p] + b1 * xv
                    v2 = r2[p] + b2 * xv
                    v3 = r3[p] + b3 * xv
                    r0[p] = v0
                    r1[p] = v1
                    r2[p] = v2
                    r3[p] = v3
                    acc[p] += (v0 * c0 + v1 * c1) + (v2 * c2 + v3 * c3)
                n4 += 4
            for n in range(n4, nst):
                bn = Bm[b, t, g, n]
                cn = Cm[b, t, g, n]
                rn = r[n]
                for p in range(hd):
                    v = rn[p] + bn * xdt[p]
                    rn[p] = v
                    acc[p] += v * cn
            for p in range(hd):
                y[b, t, h, p] = sig * acc[p] + dd * x[b, t, h, p]
        for p in range(hd):
            for n in range(nst):
                hlast[b, h, p, n] = sig * r[n, p]


def _ssd_bwd_kernel(
    item0,
    item1,
    x,
    dt,
    A,
    Bm,
    Cm,
    Dv,
    ck,
    dy,
    dlast,
    has_D,
    has_dlast,
    heads_per_group,
    nsplit,
    seg,
    one,
    dx,
    ddt,
    dA_part,
    dD_part,
    dh0,
    dB_part,
    dC_part,
):
    """Backward for work items item0 <= item < item1 of b * G * nsplit, item = (batch row, group, split of the
    group's heads).

    Inputs as in _ssd_fwd_kernel plus ck (b, H, ceil(L / seg), N, P) the forward's checkpoints, dy (b, L, H, P) and
    dlast (b, H, P, N). Writes dx (b, L, H, P), ddt (b, L, H) (w.r.t. the discretised step), dh0 (b, H, P, N),
    dA_part and dD_part (b, H) (summed over the batch by the caller), and adds into dB_part, dC_part (b, nsplit, L, G,
    N), zero-initialised (summed over the splits by the caller). Per head, segment by segment from the end: the
    segment's states recomputed from its checkpoint into scratch (with dC, which does not depend on G), then the
    reverse-time recurrence of G_t = dL/ds_t run over them. States and G are kept scaled as in the forward
    (``s_t = sig_t * r_t``, ``G_t = gam_t * q_t``)."""
    _, seqlen, heads, hd = x.shape
    groups = Bm.shape[2]
    nst = Bm.shape[3]
    zero = one - one
    lo = one * _LOW
    hi = one / lo
    nseg = (seqlen + seg - 1) // seg
    buf = np.zeros((seg + 1, nst, hd), dtype=dx.dtype)  # buf[i + 1] = r_{t0 + i}, buf[0] = r_{t0 - 1}
    sigs = np.zeros(seg + 1, dtype=dx.dtype)  # their scales: s = sigs[i] * buf[i]
    decay = np.zeros(seg, dtype=dx.dtype)
    q = np.zeros((nst, hd), dtype=dx.dtype)  # G / gam, transposed
    xdt = np.zeros(hd, dtype=dx.dtype)
    dys = np.zeros(hd, dtype=dx.dtype)
    dyl = np.zeros(hd, dtype=dx.dtype)
    dxdt = np.zeros(hd, dtype=dx.dtype)
    for item in range(item0, item1):
        b = item // (groups * nsplit)
        g = (item // nsplit) % groups
        part = item % nsplit
        first = g * heads_per_group + (part * heads_per_group) // nsplit
        last = g * heads_per_group + ((part + 1) * heads_per_group) // nsplit
        dBp = dB_part[b, part]
        dCp = dC_part[b, part]
        for h in range(first, last):
            ah = A[h]
            dd = Dv[h] if has_D else zero
            # segments from the end
            for n in range(nst):
                for p in range(hd):
                    q[n, p] = dlast[b, h, p, n] if has_dlast else zero
            gam = one
            a_next = one
            dA_acc = zero
            dD_acc = zero
            for k in range(nseg - 1, -1, -1):
                t0 = k * seg
                t1 = min(seqlen, t0 + seg)
                ckt = ck[b, h, k]
                for n in range(nst):
                    for p in range(hd):
                        buf[0, n, p] = ckt[n, p]
                sigs[0] = one
                sig = one
                for t in range(t0, t1):
                    i = t - t0
                    dtv = dt[b, t, h]
                    a = math.exp(dtv * ah)
                    decay[i] = a
                    sig = sig * a
                    # the state and, as it does not depend on G, dC_t[n] = sum_p s_t[n, p] dy_t[p]
                    for p in range(hd):
                        dyl[p] = dy[b, t, h, p]
                    if sig >= lo and sig <= hi:
                        inv = one / sig
                        for p in range(hd):
                            xdt[p] = dtv * x[b, t, h, p] * inv
                        n4 = 0
                        while n4 + 4 <= nst:  # four rows per pass over the lanes, as in the forward
                            b0, b1, b2, b3 = (
                                Bm[b, t, g, n4],
                                Bm[b, t, g, n4 + 1],
                                Bm[b, t, g, n4 + 2],
                                Bm[b, t, g, n4 + 3],
                            )
                            p0, p1, p2, p3 = buf[i, n4], buf[i, n4 + 1], buf[i, n4 + 2], buf[i, n4 + 3]
                            r0, r1, r2, r3 = buf[i + 1, n4], buf[i + 1, n4 + 1], buf[i + 1, n4 + 2], buf[i + 1, n4 + 3]
                            sc0 = zero
                            sc1 = zero
                            sc2 = zero
                            sc3 = zero
                            for p in range(hd):
                                xv = xdt[p]
                                dv = dyl[p]
                                v0 = p0[p] + b0 * xv
                                v1 = p1[p] + b1 * xv
                                v2 = p2[p] + b2 * xv
                                v3 = p3[p] + b3 * xv
                                r0[p] = v0
                                r1[p] = v1
                                r2[p] = v2
                                r3[p] = v3
                                sc0 += v0 * dv
                                sc1 += v1 * dv
                                sc2 += v2 * dv
                                sc3 += v3 * dv
                            dCp[t, g, n4] += sig * sc0
                            dCp[t, g, n4 + 1] += sig * sc1
                            dCp[t, g, n4 + 2] += sig * sc2
                            dCp[t, g, n4 + 3] += sig * sc3
                            n4 += 4
                        for n in range(n4, nst):
                            bn = Bm[b, t, g, n]
                            prev = buf[i, n]
                            cur = buf[i + 1, n]
                            sc = zero
                            for p in range(hd):
                                v = prev[p] + bn * xdt[p]
                                cur[p] = v
                                sc += v * dyl[p]
                            dCp[t, g, n] += sig * sc
                    else:
                        for p in range(hd):
                            xdt[p] = dtv * x[b, t, h, p]
                        for n in range(nst):
                            bn = Bm[b, t, g, n]
                            prev = buf[i, n]
                            cur = buf[i + 1, n]
                            sc = zero
                            for p in range(hd):
                                v = sig * prev[p] + bn * xdt[p]
                                cur[p] = v
                                sc += v * dyl[p]
                            dCp[t, g, n] += sc
                        sig = one
                    sigs[i + 1] = sig
                for t in range(t1 - 1, t0 - 1, -1):
                    i = t - t0
                    a = decay[i]
                    dtv = dt[b, t, h]
                    gam = gam * a_next
                    if not (gam >= lo and gam <= hi):
                        for n in range(nst):
                            for p in range(hd):
                                q[n, p] *= gam
                        gam = one
                    ginv = one / gam
                    for p in range(hd):
                        xdt[p] = dtv * x[b, t, h, p]
                        dys[p] = dy[b, t, h, p] * ginv
                        dxdt[p] = zero
                    da = zero
                    for n in range(nst):
                        bn = Bm[b, t, g, n]
                        cn = Cm[b, t, g, n]
                        qn = q[n]
                        prev = buf[i, n]
                        sb = zero
                        dr = zero  # per row: a reduction carried across rows would chain their latencies
                        for p in range(hd):
                            gv = qn[p] + dys[p] * cn
                            qn[p] = gv
                            sb += gv * xdt[p]
                            dxdt[p] += gv * bn
                            dr += gv * prev[p]
                        dBp[t, g, n] += gam * sb
                        da += dr
                    dxs = zero
                    dds = zero
                    for p in range(hd):
                        xv = x[b, t, h, p]
                        dyv = dy[b, t, h, p]
                        dxt = gam * dxdt[p]
                        dx[b, t, h, p] = dtv * dxt + dd * dyv
                        dxs += dxt * xv
                        dds += dyv * xv
                    dlog = gam * sigs[i] * da * a  # dL/d(Δ_t A_h)
                    ddt[b, t, h] = dxs + dlog * ah
                    dA_acc += dlog * dtv
                    dD_acc += dds
                    a_next = a
            for p in range(hd):
                for n in range(nst):
                    dh0[b, h, p, n] = a_next * gam * q[n, p]
            dA_part[b, h] = dA_acc
            dD_part[b, h] = dD_acc


_KERNELS = None


def _cache_named(fn):
    """Suffix the qualname (numba's on-disk cache key) with a hash of this module's name, so the same file imported
    under two names (package module, remote-code copy) never loads the other's cache entry."""
    fn.__qualname__ = f"{fn.__name__}_{zlib.crc32(__name__.encode()) & 0xFFFFFFFF:08x}"
    return fn


def _numba_kernels():
    """Jit (or load from the on-disk cache) the kernels; returns (forward, backward)."""
    global _KERNELS
    with _LOCK:
        if _KERNELS is None:
            numba = _try_import("numba")
            if numba is None:
                raise RuntimeError("the numba SSD scan needs numba (pip install numba)")
            opts = dict(cache=True, fastmath=_FASTMATH, nogil=True)
            _KERNELS = (
                numba.njit(**opts)(_cache_named(_ssd_fwd_kernel)),
                numba.njit(**opts)(_cache_named(_ssd_bwd_kernel)),
            )
        return _KERNELS


# --------------------------------------------------------------------------------------------------------------
# the autograd function
# --------------------------------------------------------------------------------------------------------------


def _segment_length(seqlen: int, n_state: int, head_dim: int, itemsize: int) -> int:
    """Steps between the forward's checkpoints (= the backward's recompute segment): (K + 1) states fit in
    `SEGMENT_BYTES` (at least 4 steps), and K >= N / `CHECKPOINT_RATIO` so that the checkpoints, L / K states of N x P,
    take at most `CHECKPOINT_RATIO` times the bytes of x."""
    by_cache = max(4, SEGMENT_BYTES // max(1, n_state * head_dim * itemsize) - 1)
    by_memory = -(-n_state // CHECKPOINT_RATIO)
    return int(max(1, min(seqlen, max(by_cache, by_memory))))


def _head_splits(bsz: int, groups: int, heads_per_group: int, nthreads: int) -> int:
    """Splits of each group's heads in the backward: enough work items to keep every thread busy, few enough to
    keep the dB/dC partial sums small."""
    if nthreads <= 1:
        return 1
    return int(max(1, min(heads_per_group, -(-2 * nthreads // max(1, bsz * groups)))))


class SSDScanFunction(torch.autograd.Function):
    """The SSD scan on CPU tensors (numba kernels) with an exact backward.

    ``apply(x, dt, A, B, C, D, initial_state) -> (y, final_state)``: x (b, L, H, P), dt (b, L, H) the discretised
    step, A and D (H,), B and C (b, L, G, N), initial_state (b, H, P, N); D and initial_state may be None. y
    (b, L, H, P) and final_state (b, H, P, N) are in the compute dtype (float64 for float64 inputs, else float32);
    both are differentiable. Only the inputs are saved for the backward.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state):
        fwd, _ = _numba_kernels()
        cd = _compute_dtype(x, dt, A, B, C, initial_state)
        bsz, seqlen, heads, head_dim = x.shape
        groups, n_state = B.shape[2], B.shape[3]
        seg = _segment_length(seqlen, n_state, head_dim, 8 if cd == torch.float64 else 4)
        # the backward's checkpoints: the state entering every seg-th step (only when a gradient will be asked)
        nck = -(-seqlen // seg) if any(ctx.needs_input_grad) else 0
        y = torch.empty(bsz, seqlen, heads, head_dim, dtype=cd)
        final = torch.empty(bsz, heads, head_dim, n_state, dtype=cd)
        ck = torch.empty(bsz, heads, nck, n_state, head_dim, dtype=cd)
        _run_parallel(
            fwd,
            bsz * heads,
            _np_in(x, cd, 4),
            _np_in(dt, cd, 3),
            _np_in(A, cd, 1),
            _np_in(B, cd, 4),
            _np_in(C, cd, 4),
            _np_in(D, cd, 1),
            _np_in(initial_state, cd, 4),
            y.numpy(),
            final.numpy(),
            ck.numpy(),
            D is not None,
            initial_state is not None,
            nck > 0,
            seg,
            heads // groups,
            _one(cd),
        )
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state)
        ctx.checkpoints, ctx.segment = ck, seg
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        _, bwd = _numba_kernels()
        x, dt, A, B, C, D, initial_state = ctx.saved_tensors
        cd = _compute_dtype(x, dt, A, B, C, initial_state)
        bsz, seqlen, heads, head_dim = x.shape
        groups, n_state = B.shape[2], B.shape[3]
        heads_per_group = heads // groups
        nsplit = _head_splits(bsz, groups, heads_per_group, max(1, torch.get_num_threads()))
        dx = torch.empty(bsz, seqlen, heads, head_dim, dtype=cd)
        ddt = torch.empty(bsz, seqlen, heads, dtype=cd)
        dA_part = torch.empty(bsz, heads, dtype=cd)
        dD_part = torch.empty(bsz, heads, dtype=cd)
        dh0 = torch.empty(bsz, heads, head_dim, n_state, dtype=cd)
        dB_part = torch.zeros(bsz, nsplit, seqlen, groups, n_state, dtype=cd)
        dC_part = torch.zeros(bsz, nsplit, seqlen, groups, n_state, dtype=cd)
        if dy is None:
            dy = torch.zeros(bsz, seqlen, heads, head_dim, dtype=cd)
        _run_parallel(
            bwd,
            bsz * groups * nsplit,
            _np_in(x, cd, 4),
            _np_in(dt, cd, 3),
            _np_in(A, cd, 1),
            _np_in(B, cd, 4),
            _np_in(C, cd, 4),
            _np_in(D, cd, 1),
            ctx.checkpoints.numpy(),
            _np_in(dy, cd, 4),
            _np_in(dfinal, cd, 4),
            D is not None,
            dfinal is not None,
            heads_per_group,
            nsplit,
            ctx.segment,
            _one(cd),
            dx.numpy(),
            ddt.numpy(),
            dA_part.numpy(),
            dD_part.numpy(),
            dh0.numpy(),
            dB_part.numpy(),
            dC_part.numpy(),
        )
        need = ctx.needs_input_grad

        def out(flag, grad, like):
            return grad.to(like.dtype) if flag and like is not None else None

        return (
            out(need[0], dx, x),
            out(need[1], ddt, dt),
            out(need[2], dA_part.sum(0), A),
            out(need[3], dB_part.sum(1) if nsplit > 1 else dB_part[:, 0], B),
            out(need[4], dC_part.sum(1) if nsplit > 1 else dC_part[:, 0], C),
            out(need[5], dD_part.sum(0), D),
            out(need[6], dh0, initial_state),
        )


def ssd_numba_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan over a whole sequence on CPU tensors, with `ssd_scan.ssd_chunk_scan`'s signature.

    x (b, L, H, P), dt (b, L, H), A (H,), B and C (b, L, G, N), D (H,), dt_bias (H,), initial_states (b, H, P, N).
    Returns y (b, L, H, P), and the final state (b, H, P, N) when ``return_final_states``, in float32 (float64 for
    float64 inputs); differentiable in every tensor input. ``chunk_size`` is accepted and ignored (the kernel is
    sequential in time); ``z`` (gating) is not supported (Mamba-2 gates in its norm).
    """
    if z is not None:
        raise ValueError("ssd_numba_scan: gating (z) is applied by the gated norm, pass z=None")
    if x.device.type != "cpu":
        raise RuntimeError(f"ssd_numba_scan runs on CPU tensors only (got device {x.device})")
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    if heads % groups or tuple(B.shape) != (batch, length, groups, state_size) or C.shape != B.shape:
        raise ValueError(
            f"ssd_numba_scan: B and C must be (b, L, G, N) with G dividing H={heads}, got {tuple(B.shape)} and "
            f"{tuple(C.shape)}"
        )
    cd = _compute_dtype(x, dt, A, B, C, initial_states)
    step = discretised_step(dt, dt_bias, dt_softplus, dt_limit, cd)
    if length == 0:
        y = x.new_zeros(batch, 0, heads, head_dim, dtype=cd)
        if initial_states is None:
            final = x.new_zeros(batch, heads, head_dim, state_size, dtype=cd)
        else:
            final = initial_states.to(cd)
        return (y, final) if return_final_states else y
    y, final = SSDScanFunction.apply(x, step, A, B, C, D, initial_states)
    return (y, final) if return_final_states else y
