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
functions for other triton kernels such as Mamba-2's SSD), and :func:`stock_mamba_patches` points stock
transformers Mamba at the same emulated kernels.
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
    """Gradients of ``fn(*inputs)`` (None inputs pass through) against ``grad_out``, zeros where unused.

    Runs on a fresh thread: the body of a ``torch.library`` custom op (causal_conv1d's) runs with autograd's
    dispatch keys excluded in this thread, where even ``enable_grad`` would build no graph."""

    def work():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
        with torch.enable_grad():
            y = fn(*leaves)
        used = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, used, grad_out, allow_unused=True))
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
            functions in place of other triton kernels).
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
