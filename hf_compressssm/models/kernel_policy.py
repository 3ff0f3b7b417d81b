"""The one policy that picks the Mamba-1 kernels: scan, convolution, fused training path and decode step.

This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports only
``torch`` and the standard library; ``numba``, ``mambapy``, ``mamba_ssm`` and ``causal_conv1d`` are imported
lazily, at most once, and only to learn whether they can run.

Precedence (:func:`requested_backend`), first match wins:

1. the environment variable ``HF_COMPRESSSSM_SCAN_BACKEND``, when set to anything but ``auto``;
2. the requested backend (a model's ``config.scan_backend``, or the ``backend`` argument), when not ``auto``;
3. ``auto``: on CUDA tensors ``mamba_ssm`` (with ``causal_conv1d`` for the convolution) when installed and the
   inputs are within the kernels' limits, on CPU tensors the numba scan when installed, else the portable torch
   code.

Kernel limits (:func:`kernel_limits`), checked before any dispatch: inputs in float32/float16/bfloat16 (no
float64), ``d_state <= 256``, convolution width 2-4, activation SiLU (``silu``/``swish``) for the convolution
kernel and the fused path. Under ``auto`` an input outside the limits falls back to the portable path (the
caller warns once); a *forced* ``mamba_ssm`` raises a ``RuntimeError`` naming the limit. The fused training path
(``mamba_inner_fn``) additionally needs ``causal_conv1d``, a training forward without cache, no padding in the
attention mask (the kernel does not re-mask after the convolution) and plain ``nn.Linear``/``nn.Conv1d``
projections (it reads their weights directly, so a LoRA wrapper would be bypassed). CPU tensors never reach a
CUDA extension: the kernels are chosen only for CUDA tensors.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass

import torch


__all__ = [
    "BACKENDS",
    "CONV_WIDTHS",
    "ENV_VAR",
    "KERNEL_DTYPES",
    "MAX_KERNEL_STATE",
    "KernelPlan",
    "available_backends",
    "kernel_limits",
    "normalise_backend",
    "plan_kernels",
    "requested_backend",
    "resolve_scan_backend",
]

ENV_VAR = "HF_COMPRESSSSM_SCAN_BACKEND"
BACKENDS = ("numba", "mamba_ssm", "mambapy", "torch")
_ALIASES = {
    "auto": "auto",
    "": "auto",
    "fast": "numba",
    "numba": "numba",
    "torch": "torch",
    "mambapy": "mambapy",
    "mamba_ssm": "mamba_ssm",
    "mamba-ssm": "mamba_ssm",
}
#: dtypes the CUDA kernels (selective scan, causal conv1d, state update) take.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: largest state size of ``selective_scan_cuda``.
MAX_KERNEL_STATE = 256
#: convolution widths of ``causal_conv1d``.
CONV_WIDTHS = (2, 3, 4)
#: activations of ``causal_conv1d`` (``None`` = identity) and of the fused path (SiLU only).
CONV_ACTIVATIONS = (None, "silu", "swish")

# --------------------------------------------------------------------------------------------------------------
# optional dependencies, imported lazily and at most once
# --------------------------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_IMPORTS: dict = {}

_SCAN_MODULE = "mamba_ssm.ops.selective_scan_interface"
_STEP_MODULE = "mamba_ssm.ops.triton.selective_state_update"
_CONV_MODULE = "causal_conv1d"


def _try_import(name: str):
    """Import ``name`` once; return the module or None (remembering the failure)."""
    with _LOCK:
        if name not in _IMPORTS:
            mod = None
            if importlib.util.find_spec(name.split(".")[0]) is not None:
                try:
                    mod = importlib.import_module(name)
                except Exception as exc:  # a broken install (e.g. no compiled extension) counts as unavailable
                    warnings.warn(f"importing {name} failed ({exc!r}); its kernels are unavailable", stacklevel=2)
            _IMPORTS[name] = mod
        return _IMPORTS[name]


def _numba_importable() -> bool:
    return _try_import("numba") is not None


def _mambapy_importable() -> bool:
    return _try_import("mambapy.pscan") is not None


def _mamba_ssm_importable() -> bool:
    return _try_import(_SCAN_MODULE) is not None


def _causal_conv1d_importable() -> bool:
    return _try_import(_CONV_MODULE) is not None


def _state_update_importable() -> bool:
    return _try_import(_STEP_MODULE) is not None


def _fused_importable() -> bool:
    """``mamba_inner_fn`` can run: mamba_ssm imported *with* causal_conv1d's compiled functions."""
    mod = _try_import(_SCAN_MODULE)  # the name differs across mamba_ssm versions (None when causal_conv1d is absent)
    return mod is not None and any(
        getattr(mod, name, None) is not None for name in ("causal_conv1d_fwd_function", "causal_conv1d_cuda")
    )


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        device = device.device
    if device is None:
        return "cpu"
    return torch.device(device).type


# --------------------------------------------------------------------------------------------------------------
# the policy
# --------------------------------------------------------------------------------------------------------------


def normalise_backend(name) -> str:
    """``auto``, ``numba``, ``mamba_ssm``, ``mambapy`` or ``torch`` for a backend name or alias."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown selective-scan backend {name!r}; expected one of auto, fast, numba, torch, mambapy, mamba_ssm"
        )
    return _ALIASES[key]


def requested_backend(requested=None) -> tuple[str, str]:
    """(backend, source): the environment variable unless unset/``auto``, then ``requested`` unless None/``auto``."""
    env = os.environ.get(ENV_VAR, "")
    if env.strip() and normalise_backend(env) != "auto":
        return normalise_backend(env), f"environment variable {ENV_VAR}={env!r}"
    if requested is not None and normalise_backend(requested) != "auto":
        return normalise_backend(requested), f"scan_backend={requested!r}"
    return "auto", "auto"


def kernel_limits(
    dtype: torch.dtype | None = None,
    d_state: int | None = None,
    conv_width: int | None = None,
    activation: str | None = "silu",
) -> dict[str, list[str]]:
    """Why the CUDA kernels cannot take these inputs: ``{"scan": [...], "conv": [...], "fused": [...]}``."""
    scan, conv = [], []
    if dtype is not None and dtype not in KERNEL_DTYPES:
        msg = f"dtype {dtype} (the CUDA kernels take float32, float16 and bfloat16)"
        scan.append(msg)
        conv.append(msg)
    if d_state is not None and d_state > MAX_KERNEL_STATE:
        scan.append(f"state size {d_state} > {MAX_KERNEL_STATE} (the most selective_scan_cuda takes)")
    if conv_width is not None and conv_width not in CONV_WIDTHS:
        conv.append(f"conv_kernel={conv_width} (causal_conv1d takes widths 2 to 4)")
    if activation not in CONV_ACTIVATIONS:
        conv.append(f"hidden_act={activation!r} (causal_conv1d applies only SiLU)")
    fused = list(scan) + [m for m in conv if m not in scan]
    return {"scan": scan, "conv": conv, "fused": fused}


@dataclass(frozen=True)
class KernelPlan:
    """The kernels one forward uses (both families; see `plan_kernels` and `plan_mamba2_kernels`).

    ``scan``: ``numba`` | ``mamba_ssm`` | ``mambapy`` | ``torch`` (Mamba-2: ``numba`` | ``mamba_ssm`` | ``torch``); ``conv`` and
    ``conv_step``: ``causal_conv1d`` | ``torch``; ``fused``: a training forward runs one fused kernel
    (``mamba_inner_fn``; Mamba-2: ``mamba_split_conv1d_scan_combined``); ``step`` (decode state update): ``mamba_ssm``
    (triton) | ``torch``; ``fallbacks``: why a kernel that ``auto`` would pick was not used (to warn once).
    """

    scan: str
    conv: str
    fused: bool
    step: str
    conv_step: str
    fallbacks: tuple[str, ...] = ()


def _check_forced(choice: str, source: str, dev: str, limits: dict) -> None:
    if choice == "numba":
        if dev != "cpu":
            raise RuntimeError(
                f"selective scan: {source} forces the numba kernel, which runs on CPU tensors only "
                f"(got device {dev!r}); use 'auto', 'torch' or 'mamba_ssm'"
            )
        if not _numba_importable():
            raise RuntimeError(
                f"selective scan: {source} forces the numba kernel but numba is not installed "
                "(pip install numba), or unset it / use 'auto' or 'torch'"
            )
    elif choice == "mamba_ssm":
        if dev != "cuda":
            raise RuntimeError(
                f"selective scan: {source} forces mamba_ssm, which runs on CUDA tensors only (got device {dev!r}); "
                "use 'auto' or 'torch'"
            )
        if not _mamba_ssm_importable():
            raise RuntimeError(
                f"selective scan: {source} forces mamba_ssm but it is not importable "
                "(pip install \"hf-compressssm[cuda]\" --no-build-isolation, with a CUDA torch), or use 'auto'"
            )
        if limits["scan"]:
            raise RuntimeError(
                f"selective scan: {source} forces mamba_ssm, but its kernel cannot take "
                f"{'; '.join(limits['scan'])}. Use scan_backend='auto' (falls back to the torch scan) or 'torch'."
            )
    elif choice == "mambapy" and not _mambapy_importable():
        raise RuntimeError(f"selective scan: {source} forces mambapy but it is not installed (pip install mambapy)")


def plan_kernels(
    device,
    dtype: torch.dtype | None = None,
    *,
    requested: str | None = None,
    d_state: int | None = None,
    conv_width: int | None = None,
    activation: str | None = "silu",
    training: bool = False,
    cached: bool = False,
    padded: bool = False,
    plain_modules: bool = True,
) -> KernelPlan:
    """Decide every kernel of a Mamba-1 forward from the tensors' ``device``/``dtype``, the ``requested``
    backend (``config.scan_backend``), ``HF_COMPRESSSSM_SCAN_BACKEND``, the installed packages and the kernel
    limits (see the module docstring for the precedence).

    ``padded``: the attention mask has zeros; ``plain_modules``: the mixer's projections are plain
    ``nn.Linear``/``nn.Conv1d`` (no adapter wrappers). Raises ``RuntimeError`` when a forced backend cannot run,
    ``ValueError`` for an unknown backend name.
    """
    dev = _device_type(device)
    choice, source = requested_backend(requested)
    limits = kernel_limits(dtype, d_state, conv_width, activation)
    fallbacks: list[str] = []
    if choice != "auto":
        _check_forced(choice, source, dev, limits)
        scan = choice
    elif dev == "cuda":
        if not _mamba_ssm_importable():
            scan = "torch"
            fallbacks.append(
                "mamba_ssm is not installed: the selective scan runs the portable torch code on CUDA "
                '(pip install "hf-compressssm[cuda]" for the CUDA kernels)'
            )
        elif limits["scan"]:
            scan = "torch"
            fallbacks.append(f"the mamba_ssm scan kernel cannot take {'; '.join(limits['scan'])}: using the torch scan")
        else:
            scan = "mamba_ssm"
    elif dev == "cpu" and _numba_importable():
        scan = "numba"
    else:
        scan = "torch"

    conv = "torch"
    if dev == "cuda" and choice in ("auto", "mamba_ssm"):
        if not _causal_conv1d_importable():
            fallbacks.append(
                "causal_conv1d is not installed: the convolution runs in torch and the fused training kernel is off "
                '(pip install "hf-compressssm[cuda]")'
            )
        elif limits["conv"]:
            fallbacks.append(f"causal_conv1d cannot take {'; '.join(limits['conv'])}: using the torch convolution")
        else:
            conv = "causal_conv1d"

    fused = False
    if scan == "mamba_ssm" and conv == "causal_conv1d" and training and not cached:
        if activation not in ("silu", "swish"):
            pass  # already reported through the conv limits
        elif padded:
            fallbacks.append(
                "the attention mask has padding: training runs the unfused kernels (the fused kernel would not "
                "re-apply the mask after the convolution)"
            )
        elif not plain_modules:
            pass  # adapters on the projections: the unfused path calls them as modules
        elif _fused_importable():
            fused = True
    step = "mamba_ssm" if scan == "mamba_ssm" and _state_update_importable() else "torch"
    return KernelPlan(scan=scan, conv=conv, fused=fused, step=step, conv_step=conv, fallbacks=tuple(fallbacks))


def resolve_scan_backend(device, requested=None, dtype: torch.dtype | None = None, d_state: int | None = None) -> str:
    """Name of the backend that runs a scan on ``device`` (a ``torch.device``, string, or tensor): the ``scan``
    of :func:`plan_kernels`. Raises ``RuntimeError`` when a forced backend cannot run, ``ValueError`` for an
    unknown name."""
    return plan_kernels(device, dtype, requested=requested, d_state=d_state, activation=None).scan


def available_backends(device=None) -> list[str]:
    """Backends that can run here (on ``device`` if given, else on any device), fastest first."""
    dev = None if device is None else _device_type(device)
    out = []
    if dev in (None, "cpu") and _numba_importable():
        out.append("numba")
    if dev in (None, "cuda") and _mamba_ssm_importable():
        out.append("mamba_ssm")
    if _mambapy_importable():
        out.append("mambapy")
    out.append("torch")
    return out


# --------------------------------------------------------------------------------------------------------------
# Mamba-2
# --------------------------------------------------------------------------------------------------------------

_SSD_MODULE = "mamba_ssm.ops.triton.ssd_combined"


def plan_mamba2_kernels(
    device,
    dtype: torch.dtype | None = None,
    *,
    conv_width: int,
    activation: str | None,
    training: bool,
    cached: bool,
    plain_modules: bool,
    padded: bool,
    conv_dim: int,
    state_size: int,
) -> KernelPlan:
    """The kernels of one Mamba-2 forward.

    CPU: the numba SSD scan of ``ssd_numba_scan.py`` when numba is importable, else the torch code of
    ``ssd_scan.py``; ``HF_COMPRESSSSM_SCAN_BACKEND=torch`` forces the torch code, ``numba``/``fast`` forces the numba
    scan (a ``RuntimeError`` when numba is missing); its other values concern Mamba-1 or CUDA and leave the choice
    to ``auto`` here. Other devices but CUDA: the torch code. The decode step is the torch step on every device but
    CUDA. CUDA: ``mamba_ssm``'s SSD kernels and
    ``causal_conv1d`` when importable and the dtype is float32/float16/bfloat16; ``causal_conv1d`` also needs conv
    width 2-4 and a SiLU activation. The fused training kernel additionally needs plain ``conv1d``/``norm``/``out_proj``
    modules (an adapter there would be bypassed), no padding in the batch (it does not re-mask after the convolution)
    and ``I + 2GN`` (``conv_dim``) divisible by 8 (``mamba_ssm``'s ``ensure_stride`` asserts it); otherwise the
    unfused kernels run. ``fallbacks`` says why a kernel was not used on CUDA. In the returned `KernelPlan`,
    ``scan``/``step`` ``mamba_ssm`` mean the triton SSD kernels (``mamba_chunk_scan_combined`` /
    ``selective_state_update``) and ``fused`` means ``mamba_split_conv1d_scan_combined``.
    """
    dev = _device_type(device)
    if dev != "cuda":
        scan = "torch"
        if dev == "cpu":
            choice, source = requested_backend()
            if choice == "numba":
                _check_forced(choice, source, dev, {})
            if choice in ("auto", "numba", "mamba_ssm", "mambapy") and _numba_importable():
                scan = "numba"
        return KernelPlan(scan, "torch", False, "torch", "torch")
    fallbacks = []
    dtype_ok = dtype is None or dtype in KERNEL_DTYPES
    ssd = _try_import(_SSD_MODULE)
    if ssd is None:
        fallbacks.append(
            'mamba_ssm is not installed: the SSD scan runs the torch code on CUDA (pip install "hf-compressssm[cuda]")'
        )
    elif not dtype_ok:
        fallbacks.append(f"the mamba_ssm SSD kernels cannot take dtype {dtype}: using the torch code")
    scan = "mamba_ssm" if ssd is not None and dtype_ok else "torch"
    step = "mamba_ssm" if scan == "mamba_ssm" else "torch"
    conv = "torch"
    if _try_import(_CONV_MODULE) is None:
        fallbacks.append(
            'causal_conv1d is not installed: the convolution runs in torch (pip install "hf-compressssm[cuda]")'
        )
    elif conv_width not in CONV_WIDTHS or activation not in ("silu", "swish") or not dtype_ok:
        fallbacks.append(
            f"causal_conv1d cannot take conv_kernel={conv_width}, hidden_act={activation!r}, dtype {dtype}: using "
            f"the torch convolution"
        )
    else:
        conv = "causal_conv1d"
    fused = False
    if training and not cached and scan == "mamba_ssm" and conv == "causal_conv1d":
        if conv_dim % 8:
            fallbacks.append(
                f"the fused mamba_ssm kernel needs I + 2GN divisible by 8, got {conv_dim} (N = {state_size}): using "
                f"the unfused kernels"
            )
        fused = plain_modules and not padded and conv_dim % 8 == 0
    return KernelPlan(scan, conv, fused, step, conv, tuple(fallbacks))
