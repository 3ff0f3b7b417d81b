"""Hankel-nuclear-norm (HNN) regularised training: the baseline CompreSSM is compared against (docs/method.md §6).

Schwerdtner, Berman and Peherstorfer (NeurIPS 2025) add ``λ·Σσ`` (the sum of Hankel singular values of every SSM
layer) to the training loss at every step, so that training concentrates the Hankel energy in few states, and
truncate once after training. For a selective (Mamba-1) mixer there is no fixed LTI system, so ``Σσ`` is defined on
the same time-averaged LTI surrogate that CompreSSM's scores use (docs/method.md §3), computed **differentiably on the
current batch**. For each channel ``d`` a diagonal single-input single-output system with

* poles   ``ā_{d,n} = mean_t exp(Δ_{t,d} A_{d,n})``
* input   ``b_{d,n} = sqrt(mean_t (Δ_{t,d} u_{t,d} B_{t,n})²)``
* output  ``c_n     = sqrt(mean_t C_{t,n}²)``           (shared by all channels, as ``C_t`` is)

and ``Σσ(layer) = Σ_d hankel_nuclear_norm(ā_d, b_d, c)`` (batched over ``d``); the regulariser is the sum over
layers. Means run over the valid tokens of the batch (``attention_mask``). The projections ``u, Δ, B, C`` are
recomputed from each mixer's input by its family's `projections` (as calibration does), with gradients, so the penalty
reaches ``A_log``, ``x_proj``, ``dt_proj``, ``conv1d``, ``in_proj`` and, through the mixer inputs, earlier layers.

Usage::

    trainer = HNNTrainer(model=model, args=training_args, train_dataset=ds, hnn_ratio=0.1)
    trainer.train()
    compress_model(model, calibration_loader, tau=0.05)   # the one truncation after training

``hnn_lambda`` fixes λ; otherwise λ is set once, at the first training step, to ``hnn_ratio · loss / Σσ`` of that
step (so the penalty starts at ``hnn_ratio`` times the task loss whatever the model's scale) and then kept fixed.

Cost: per layer and step it computes ``exp`` over (tokens, D, N) (recomputed in chunks in the backward, so memory
stays O(chunk·D·N)) and, per channel, two N×N Cholesky factorisations and an N×N SVD in float64, forward and
backward: O(D·N³) per layer and step, independent of the scan kernel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..families import family_of_mixer, find_mixers
from .hankel import hankel_nuclear_norm


__all__ = [
    "HNNTrainer",
    "HankelNuclearNormRegularizer",
    "mixer_lti_surrogate",
    "hankel_nuclear_norm_of_model",
    "mixer_hankel_nuclear_norm",
]

_CHUNK_ELEMENTS = 1 << 22  # float32 elements of one (tokens, D, N) chunk of exp(ΔA): 16 MiB


class _MeanDecay(torch.autograd.Function):
    """``mean_t exp(Δ_{t,d} A_{d,n})`` for ``delta`` (T, D), ``A`` (D, N) → (D, N) float64, recomputed in chunks in the
    backward so that no (T, D, N) tensor is kept."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, A: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros(A.shape, dtype=torch.float64, device=A.device)
        for start in range(0, delta.shape[0], chunk):
            total += torch.exp(delta[start : start + chunk, :, None] * A).sum(0, dtype=torch.float64)
        ctx.save_for_backward(delta, A)
        ctx.chunk = chunk
        return total / max(1, delta.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        delta, A = ctx.saved_tensors
        scale = grad.to(A.dtype) / max(1, delta.shape[0])  # (D, N)
        g_delta = torch.empty_like(delta) if ctx.needs_input_grad[0] else None
        g_A = torch.zeros_like(A) if ctx.needs_input_grad[1] else None
        for start in range(0, delta.shape[0], ctx.chunk):
            d = delta[start : start + ctx.chunk]
            e = torch.exp(d[:, :, None] * A) * scale  # (t, D, N): grad · exp(ΔA)
            if g_delta is not None:
                g_delta[start : start + ctx.chunk] = (e * A).sum(-1)
            if g_A is not None:
                g_A += (e * d[:, :, None]).sum(0)
        return g_delta, g_A, None


def mixer_lti_surrogate(
    mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The differentiable time-averaged LTI surrogate of one Mamba mixer on a batch.

    Args:
        mixer: a `MambaMixer` (ours or stock).
        hidden_states: the mixer's input, (batch, L, hidden).
        attention_mask: optional (batch, L) of 0/1; padded tokens are left out of every mean.
    Returns:
        ``poles`` (D, N) = ā, ``b`` (D, N) and ``c`` (N,), float64, with gradients to the mixer's parameters and
        to ``hidden_states``.
    """
    u, delta, A, B, C = family_of_mixer(mixer).projections(mixer, hidden_states, attention_mask)
    u2, d2, B2, C2 = (t.reshape(-1, t.shape[-1]) for t in (u, delta, B, C))
    if attention_mask is not None:
        keep = attention_mask.reshape(-1).bool()
        u2, d2, B2, C2 = u2[keep], d2[keep], B2[keep], C2[keep]
    tokens = max(1, u2.shape[0])
    chunk = max(1, _CHUNK_ELEMENTS // max(1, A.numel()))
    poles = _MeanDecay.apply(d2, A, chunk).clamp(max=1.0 - 1e-7)
    b2 = ((d2 * u2).square().mT.double() @ B2.double().square()) / tokens  # (D, N)
    c2 = C2.double().square().sum(0) / tokens  # (N,)
    # A relative floor keeps the Gramians positive definite (and sqrt differentiable) for dead channels or states.
    b = torch.sqrt(b2 + 1e-10 * b2.detach().mean() + 1e-30)
    c = torch.sqrt(c2 + 1e-10 * c2.detach().mean() + 1e-30)
    return poles, b, c


def mixer_hankel_nuclear_norm(
    mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``Σ_d Σσ`` of one mixer's surrogate (scalar float64, differentiable)."""
    poles, b, c = mixer_lti_surrogate(mixer, hidden_states, attention_mask)
    return hankel_nuclear_norm(poles, b[:, :, None], c[None, None, :]).sum()


class HankelNuclearNormRegularizer:
    """Forward pre-hooks on every mixer of ``model`` that compute its ``Σσ`` on the batch being trained on.

    Only active in training mode with gradients enabled (evaluation forwards cost nothing). After a forward,
    :meth:`pop` returns the per-layer values (and clears them).
    """

    def __init__(self, model: nn.Module | None = None):
        self._handles: list[Any] = []
        self._values: dict[int, torch.Tensor] = {}
        if model is not None:
            self.attach(model)

    def attach(self, model: nn.Module) -> None:
        self.detach()
        mixers = find_mixers(model)
        if not mixers:
            raise ValueError(f"{type(model).__name__} has no Mamba mixers: nothing to regularise.")
        for index, mixer in enumerate(mixers):
            self._handles.append(mixer.register_forward_pre_hook(self._hook(index, mixer), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._values = {}

    def _hook(self, index: int, mixer: nn.Module):
        def hook(module, args, kwargs):
            if not (module.training and torch.is_grad_enabled()):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = kwargs.get("attention_mask")
            if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(hidden.shape[:2])):
                mask = None
            self._values[index] = mixer_hankel_nuclear_norm(mixer, hidden, mask)
            return None

        return hook

    def pop(self) -> list[torch.Tensor]:
        values = [self._values[i] for i in sorted(self._values)]
        self._values = {}
        return values


class HNNTrainer(Trainer):
    """A `Trainer` whose training loss is ``task loss + λ·Σσ`` (see the module docstring).

    Args:
        hnn_lambda: fixed λ; ``None`` sets it at the first step to ``hnn_ratio · loss / Σσ``.
        hnn_ratio: the penalty's share of the first step's task loss when λ is set automatically.
        Everything else goes to `Trainer`.

    Attributes after training: ``hnn_lambda`` (the λ used), ``hnn_history`` (per logged step: step, task loss,
    Σσ per layer), ``hnn_first`` / ``hnn_last`` (the same for the first and the last step).
    """

    def __init__(
        self, *args, hnn_lambda: float | None = None, hnn_ratio: float = 0.1, hnn_log_every: int = 10, **kwargs
    ):
        super().__init__(*args, **kwargs)
        if hnn_lambda is not None and (not math.isfinite(hnn_lambda) or hnn_lambda < 0):
            raise ValueError(f"hnn_lambda={hnn_lambda} must be a finite number >= 0.")
        if not (math.isfinite(hnn_ratio) and hnn_ratio >= 0):
            raise ValueError(f"hnn_ratio={hnn_ratio} must be a finite number >= 0.")
        self.hnn_lambda = hnn_lambda
        self.hnn_ratio = float(hnn_ratio)
        self.hnn_log_every = max(1, int(hnn_log_every))
        self.hnn_history: list[dict[str, Any]] = []
        self.hnn_first: dict[str, Any] | None = None
        self.hnn_last: dict[str, Any] | None = None
        self._regularizer = HankelNuclearNormRegularizer()
        self._attached_to: nn.Module | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        base = model.module if hasattr(model, "module") else model
        if self._attached_to is not base:
            self._regularizer.attach(base)
            self._attached_to = base
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        layers = self._regularizer.pop()
        if not layers:  # evaluation, or no grad: the plain loss
            return (loss, outputs) if return_outputs else loss
        reg = torch.stack(layers).sum()
        if self.hnn_lambda is None:
            self.hnn_lambda = float(self.hnn_ratio * loss.detach().abs() / reg.detach().clamp_min(1e-30))
        record = {
            "step": int(self.state.global_step) + 1,
            "loss": float(loss.detach()),
            "sum_sigma": float(reg.detach()),
            "sum_sigma_per_layer": [float(v.detach()) for v in layers],
        }
        if self.hnn_first is None:
            self.hnn_first = record
        self.hnn_last = record
        if record["step"] % self.hnn_log_every == 0:
            self.hnn_history.append(record)
        total = loss + self.hnn_lambda * reg.to(loss.dtype)
        return (total, outputs) if return_outputs else total

    def hnn_summary(self) -> dict[str, Any]:
        """λ and the first/last regulariser values, for reports."""
        return {
            "lambda": self.hnn_lambda,
            "ratio": self.hnn_ratio,
            "first": self.hnn_first,
            "last": self.hnn_last,
            "history": list(self.hnn_history),
        }


def hankel_nuclear_norm_of_model(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[float]:
    """Per-layer ``Σσ`` of ``model`` on one batch of inputs (no gradient; for reports)."""
    values: dict[int, float] = {}
    handles = []
    for index, mixer in enumerate(find_mixers(model)):

        def hook(module, args, kwargs, index=index, mixer=mixer):
            hidden = args[0] if args else kwargs["hidden_states"]
            values[index] = float(mixer_hankel_nuclear_norm(mixer, hidden))

        handles.append(mixer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k not in ("labels",)})
    finally:
        for h in handles:
            h.remove()
    return [values[i] for i in sorted(values)]
