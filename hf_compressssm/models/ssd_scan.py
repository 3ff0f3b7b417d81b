"""Portable torch code of the Mamba-2 (SSD) kernels: chunked scan and decode step.

Recurrence per head h (group g(h)), channel p and state n, with ``Δ_t = softplus(dt_t + dt_bias)`` clamped to
``dt_limit`` and ``A_h < 0``::

    s_t[h, p, :] = exp(Δ_t[h] A_h) s_{t-1}[h, p, :] + Δ_t[h] x_t[h, p] B_t[g(h), :]
    y_t[h, p]    = C_t[g(h), :] · s_t[h, p, :] + D_h x_t[h, p]

`ssd_chunk_scan` evaluates it chunk by chunk (a Python loop over chunks, so only one chunk's (b, H, l, l) decay
matrix lives at a time), in float32 like the CUDA kernels. The signatures follow ``mamba_ssm``'s functions so a
caller can switch between them. This file imports only torch (it is copied next to saved weights as remote code).
"""

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, num_heads: int, dim: int) -> torch.Tensor:
    """Repeat the group axis ``dim`` of ``t`` so that every head of a group gets its group's slice."""
    groups = t.shape[dim]
    return t if groups == num_heads else t.repeat_interleave(num_heads // groups, dim=dim)


def discretised_step(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float] | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The step size the scans use, in ``dtype``: ``clamp(softplus(dt + dt_bias), *dt_limit)`` (softplus only with
    ``dt_softplus``; no bias when ``dt_bias`` is None, no clamp when ``dt_limit`` is None). dt (b, L, H) with
    dt_bias (H,), or the decode layout dt (b, H, P) with dt_bias (H, P)."""
    step = dt.to(dtype)
    if dt_bias is not None:
        step = step + dt_bias.to(dtype)
    if dt_softplus:
        step = F.softplus(step)
    return step if dt_limit is None else step.clamp(min=dt_limit[0], max=dt_limit[1])


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan over a whole sequence.

    x (b, L, H, P), dt (b, L, H), A (H,), B and C (b, L, G, N), D (H,), dt_bias (H,), initial_states (b, H, P, N).
    Returns y (b, L, H, P) in float32, and the final state (b, H, P, N) in float32 when ``return_final_states``.
    ``z`` (gating) is not supported here (Mamba-2 gates in its norm).
    """
    if z is not None:
        raise ValueError("ssd_chunk_scan: gating (z) is applied by the gated norm, pass z=None")
    batch, length, heads, head_dim = x.shape
    state_size = B.shape[-1]
    dt = discretised_step(dt, dt_bias, dt_softplus, dt_limit, torch.float32)
    xf = x.float()
    Bh = _heads(B.float(), heads, 2)  # (b, L, H, N)
    Ch = _heads(C.float(), heads, 2)
    a = dt * A.float()  # (b, L, H), log of the per-step decay
    xdt = xf * dt[..., None]  # (b, L, H, P)

    if initial_states is not None:
        state = initial_states.float()
    else:
        state = x.new_zeros(batch, heads, head_dim, state_size, dtype=torch.float32)
    outputs = []
    for start in range(0, length, chunk_size):
        stop = min(start + chunk_size, length)
        a_c = a[:, start:stop].transpose(1, 2)  # (b, H, l)
        cum = torch.cumsum(a_c, dim=-1)  # (b, H, l)
        b_c, c_c, xdt_c = Bh[:, start:stop], Ch[:, start:stop], xdt[:, start:stop]
        # Within the chunk: y_t += Σ_{s≤t} exp(cum_t − cum_s) (C_t·B_s) Δ_s x_s.
        diff = cum[..., :, None] - cum[..., None, :]  # (b, H, l, l), ≤ 0 on and below the diagonal
        causal = torch.ones(stop - start, stop - start, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
        scores = torch.einsum("blhn,bshn->bhls", c_c, b_c) * decay
        y = torch.einsum("bhls,bshp->blhp", scores, xdt_c)
        # From the state entering the chunk: y_t += exp(cum_t) C_t · state.
        y = y + torch.einsum("blhn,bhpn->blhp", c_c, state) * torch.exp(cum).transpose(1, 2)[..., None]
        outputs.append(y)
        # The state leaving the chunk.
        to_end = torch.exp(cum[..., -1:] - cum).transpose(1, 2)  # (b, l, H)
        state = state * torch.exp(cum[..., -1])[..., None, None] + torch.einsum(
            "blhp,blhn->bhpn", xdt_c * to_end[..., None], b_c
        )
    y = torch.cat(outputs, dim=1) if outputs else xf.new_zeros(batch, 0, heads, head_dim)
    if D is not None:
        y = y + xf * D.float()[:, None]
    return (y, state) if return_final_states else y


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> torch.Tensor:
    """One decode step; updates ``state`` (b, H, P, N) in place.

    x (b, H, P), dt (b, H, P), A (H, P, N), B and C (b, G, N), D (H, P), dt_bias (H, P) (``mamba_ssm``'s
    ``selective_state_update`` layout). Returns y (b, H, P) in x's dtype.
    """
    heads = x.shape[1]
    dt = discretised_step(dt, dt_bias, dt_softplus, None, torch.float32)
    Bh = _heads(B.float(), heads, 1)[:, :, None, :]  # (b, H, 1, N)
    Ch = _heads(C.float(), heads, 1)[:, :, None, :]
    new_state = state.float() * torch.exp(dt[..., None] * A.float()) + (dt * x.float())[..., None] * Bh
    state.copy_(new_state.to(state.dtype))
    y = (new_state * Ch).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
