"""``Σ_t expm1(Δ_td · A_dn)``: the one calibration term that needs ``tokens × D × N`` work, as one fused CPU kernel.

The decay statistic of a Mamba-1 layer (``decay_sum = count + deficit``, see :mod:`.mamba_scores`) evaluates
``expm1(Δ A)`` for every token, channel and state. Written with torch ops it allocates, writes and reads a
``(chunk, D, N)`` intermediate three times (multiply, ``expm1``, sum), so its cost is memory traffic, comparable
to a training step's for a language model of the benchmark's size. The numba kernel here streams over tokens and keeps one channel's ``N`` accumulators in registers:
no intermediate, and the inner loop over states is vectorised: ``expm1`` by a Cody-Waite range reduction and a
polynomial of ``expm1`` on the reduced argument, which keeps its *relative* precision for slow modes
(``Δ A → 0``), where ``1/(1 − ā²)`` dominates the scores.

:func:`decay_deficit_sum` picks the kernel for float32 CPU tensors when numba is importable and the torch path
(chunked, in the inputs' precision, each chunk summed into float64) otherwise: CUDA, float64, or no numba.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor


__all__ = ["decay_deficit_sum"]

BACKENDS: tuple[str, ...] = ("auto", "numba", "torch")
_DEFAULT_CHUNK_ELEMENTS = 1 << 22  # torch path: elements per (tokens, D, N) chunk
_TOKENS_PER_FLUSH = 64  # numba path: tokens summed in float32 before each float64 accumulation
# expm1(x) = 2**k · expm1(r) + (2**k − 1) with k = round(x / ln 2), r = x − k·ln 2 (two-part ln 2, |r| ≤ ln2 / 2) and
# expm1(r) by its Taylor polynomial to r⁷ (truncation < 2e-8 relative): for k = 0 the result is the polynomial
# itself, so the relative precision of small arguments is kept; below −87 the result is −1 in float32.
_LO, _HI = np.float32(-87.0), np.float32(88.0)
_L2E, _HALF = np.float32(1.4426950408889634), np.float32(0.5)
_LN2HI, _LN2LO = np.float32(0.693145751953125), np.float32(1.428606765330187e-06)
_C = [np.float32(1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64)))) for k in range(2, 8)]
_C2, _C3, _C4, _C5, _C6, _C7 = _C
_ONE = np.float32(1.0)

_LOCK = threading.Lock()
_KERNEL = None


def _deficit_kernel(item0, item1, delta_t, A, out):  # pragma: no cover - compiled by numba
    """Channels ``item0 ≤ d < item1``: ``out[d, n] = Σ_t expm1(delta_t[d, t] · A[d, n])`` (float64 ``out``)."""
    tokens = delta_t.shape[1]
    states = A.shape[1]
    acc = np.zeros(states, dtype=np.float32)
    for d in range(item0, item1):
        a = A[d]
        total = out[d]
        for start in range(0, tokens, _TOKENS_PER_FLUSH):
            stop = min(start + _TOKENS_PER_FLUSH, tokens)
            for n in range(states):
                acc[n] = np.float32(0.0)
            for t in range(start, stop):
                dl = delta_t[d, t]
                for n in range(states):
                    x = dl * a[n]
                    x = x if x > _LO else _LO
                    x = x if x < _HI else _HI
                    kf = np.floor(x * _L2E + _HALF)
                    r = (x - kf * _LN2HI) - kf * _LN2LO
                    p = r + r * r * (((((_C7 * r + _C6) * r + _C5) * r + _C4) * r + _C3) * r + _C2)
                    scale = _bits_to_float(np.int32((np.int32(kf) + np.int32(127)) << np.int32(23)))
                    acc[n] += scale * p + (scale - _ONE)
            for n in range(states):
                total[n] += np.float64(acc[n])


_bits_to_float = None  # the scan kernel's numba intrinsic (int32 -> float32 bit cast), set by _kernel()


def _kernel():
    """Compile (or load from numba's on-disk cache) the kernel; None when numba is not importable."""
    global _KERNEL, _bits_to_float
    with _LOCK:
        if _KERNEL is not None:
            return _KERNEL
        try:
            import numba
        except ImportError:
            return None
        from ..models import selective_scan

        selective_scan._numba_kernels()  # defines the bit-cast intrinsic
        _bits_to_float = selective_scan._bits_to_float
        _KERNEL = numba.njit(cache=True, nogil=True, fastmath={"contract", "arcp", "nsz"})(_deficit_kernel)
        return _KERNEL


def _torch_deficit(delta: Tensor, A: Tensor, chunk_size: int | None) -> Tensor:
    tokens, d = delta.shape
    n = A.shape[1]
    work = torch.promote_types(delta.dtype, torch.float32)
    delta_w, A_w = delta.to(work), A.to(work)
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_CHUNK_ELEMENTS // max(1, d * n))
    deficit = torch.zeros(d, n, dtype=torch.float64, device=delta.device)
    for start in range(0, tokens, chunk_size):
        chunk = delta_w[start : start + chunk_size]
        deficit += torch.expm1(chunk.unsqueeze(-1) * A_w).sum(0).to(torch.float64)
    return deficit


def decay_deficit_sum(delta: Tensor, A: Tensor, chunk_size: int | None = None, backend: str = "auto") -> Tensor:
    """``Σ_t expm1(delta[t, d] · A[d, n])`` in float64.

    Args:
        delta: ``(tokens, D)`` step sizes (≥ 0).
        A: ``(D, N)`` continuous state matrix (< 0), on ``delta``'s device.
        chunk_size: tokens per chunk of the torch path (default: ≈ 4M elements per chunk).
        backend: ``"auto"`` (numba for float32 CPU inputs when importable, else torch), ``"numba"`` (raises when
            it cannot run) or ``"torch"``.
    Returns:
        ``(D, N)`` float64 on ``delta``'s device. Both paths evaluate ``expm1`` in float32 for float32 inputs (about
        1 ulp, relative precision kept as the argument goes to 0) and accumulate in float64 (the numba path after
        each 64 tokens).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    if delta.ndim != 2 or A.ndim != 2 or A.shape[0] != delta.shape[1]:
        raise ValueError(f"delta must be (tokens, D) and A (D, N); got {tuple(delta.shape)} and {tuple(A.shape)}.")
    fits = delta.device.type == "cpu" and A.device.type == "cpu" and delta.dtype == A.dtype == torch.float32
    kernel = _kernel() if backend == "numba" or (backend == "auto" and fits) else None
    if backend == "numba" and (kernel is None or not fits):
        raise RuntimeError(
            "decay_deficit_sum: the numba backend needs numba and float32 CPU tensors; "
            f"got {delta.dtype}/{A.dtype} on {delta.device}/{A.device} (numba importable: {kernel is not None})."
        )
    if kernel is None:
        return _torch_deficit(delta, A, chunk_size)
    from ..models.selective_scan import _run_parallel

    delta_t = delta.detach().mT.contiguous().numpy()  # (D, tokens): one channel's steps are contiguous
    a = A.detach().contiguous().numpy()
    out = np.zeros(a.shape, dtype=np.float64)
    _run_parallel(kernel, a.shape[0], delta_t, a, out)
    return torch.from_numpy(out)
