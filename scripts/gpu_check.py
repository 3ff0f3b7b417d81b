"""GPU check: the real mamba_ssm / causal_conv1d kernels against our CPU and torch paths, step times, a CompreSSM run.

One prepared script for a machine with one CUDA GPU and ``pip install -e ".[cuda]"`` (about 2-4 minutes on an H200):

1. **Agreement** on the same weights (float32, 3 layers of sizes [16, 7, 3]): the GPU model with the kernels
   (fused training path; unfused eval path; triton decode step in ``generate``) against the same model on CPU
   (numba scan) and on the GPU with ``scan_backend="torch"``: max abs logit difference, max relative gradient
   difference over every parameter, generated tokens equal.
2. **Step time** of a mamba-130m-shaped model (hidden 768, 24 layers, vocab 50280; batch x length 8 x 2048,
   bf16 autocast, AdamW) at state sizes 128 / 64 / 16 / 12 on the kernels: ms per step, tokens/s, peak memory.
3. **A short CompreSSM run**: Trainer + ``CompreSSMCallback`` on a copy task (hidden 256, 4 layers, N = 64), cuts
   at four steps; sizes, loss, wall time, peak memory.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` (default ``scripts/results/gpu/``). ``--smoke`` runs
every part at toy sizes on whatever device there is (CPU in CI) so the script is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "scripts" / "results" / "gpu"), help="output folder")
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device (CPU smoke test, no timing claims)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="state sizes of the step table (128 64 16 12)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per state size, after 2 warm-up (6)")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["agreement", "timing", "compressssm"], help="parts to skip"
    )
    return p.parse_args(argv)


def _versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for dist in ("mamba-ssm", "causal-conv1d", "triton", "numba"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_and_reset(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 3)


def _lm(seed=0, **kw):
    import torch

    from hf_compressssm import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

    torch.manual_seed(seed)
    values = dict(vocab_size=100, hidden_size=64, num_hidden_layers=3, state_size=16, pad_token_id=0, use_cache=True)
    values.update(kw)
    return CompreSSMMambaForCausalLM(CompreSSMMambaConfig(**values))


def _train_step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float().cpu(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}


def _rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


def agreement(device, smoke: bool) -> dict:
    """The kernel path on ``device`` vs CPU (numba) and vs ``scan_backend='torch'`` on ``device``."""
    import torch

    from hf_compressssm.families import find_mixers

    base = _lm(state_sizes=[16, 7, 3])
    with torch.no_grad():
        for m in find_mixers(base):
            m.conv1d.bias.normal_(0.0, 0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 16 if smoke else 256), generator=g)
    dev_model = copy.deepcopy(base).to(device).train()
    plan = find_mixers(dev_model)[0].kernel_plan(device, torch.float32)
    result = {"kernel_plan_training": {f: getattr(plan, f) for f in ("scan", "conv", "fused", "step")}}
    refs = {"cpu": (copy.deepcopy(base), torch.device("cpu"))}
    torch_ref = copy.deepcopy(base)
    torch_ref.config.scan_backend = "torch"
    for m in find_mixers(torch_ref):
        m.scan_backend = "torch"
    refs["torch_on_device"] = (torch_ref.to(device), device)
    logits, grads = _train_step(dev_model, ids.to(device))
    dev_model.eval()
    gen_kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        eval_logits = dev_model(ids.to(device)).logits.float().cpu()
        gen = dev_model.generate(ids[:, :8].to(device), **gen_kwargs)
    for name, (ref, ref_dev) in refs.items():
        r_logits, r_grads = _train_step(ref, ids.to(ref_dev))
        ref.eval()
        with torch.no_grad():
            r_eval = ref(ids.to(ref_dev)).logits.float().cpu()
            r_gen = ref.generate(ids[:, :8].to(ref_dev), **gen_kwargs)
        result[f"vs_{name}"] = {
            "train_logits_max_abs": (logits - r_logits).abs().max().item(),
            "grads_max_rel": _rel(grads, r_grads),
            "eval_logits_max_abs": (eval_logits - r_eval).abs().max().item(),
            "generate_tokens_equal": bool(torch.equal(gen.sequences.cpu(), r_gen.sequences.cpu())),
            "generate_scores_max_abs": max(
                (a.cpu() - b.cpu()).abs().max().item() for a, b in zip(gen.scores, r_gen.scores)
            ),
        }
    return result


def step_times(device, sizes, steps: int, smoke: bool) -> list[dict]:
    """ms per AdamW step of a mamba-130m-shaped model at each uniform state size."""
    import torch

    shape = (
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=100)
        if smoke
        else dict(hidden_size=768, num_hidden_layers=24, vocab_size=50280)
    )
    batch, length = (2, 64) if smoke else (8, 2048)
    top = max(sizes)
    rows = []
    for size in sizes:
        model = _lm(state_size=top, state_sizes=[size] * shape["num_hidden_layers"], **shape).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(3, shape["vocab_size"], (batch, length), device=device)
        mixer = model.backbone.layers[0].mixer
        model.train()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        _peak_and_reset(device)
        times = []
        for i in range(2 + steps):
            _sync(device)
            t0 = time.perf_counter()
            with autocast:
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        ms = 1000 * sorted(times)[len(times) // 2]
        kp = mixer.kernel_plan(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        rows.append(
            {
                "state_size": size,
                "ms_per_step_median": round(ms, 2),
                "tokens_per_s": round(batch * length / (ms / 1000)),
                "peak_mem_gib": _peak_and_reset(device),
                "scan": kp.scan,
                "fused": kp.fused,
                "loss": round(loss.item(), 4),
            }
        )
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def compressssm_run(device, smoke: bool, workdir: str) -> dict:
    """Trainer + CompreSSMCallback on a copy task; four cuts."""
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_compressssm import CompreSSMCallback

    n_steps, half = (6, 8) if smoke else (200, 64)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, 100, (512 if not smoke else 32, half), generator=g)
    data = torch.cat([prefix, prefix], dim=1)  # copy task: the second half repeats the first

    class Copy(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"input_ids": data[i], "labels": data[i]}

    kw = dict(hidden_size=32, num_hidden_layers=2) if smoke else dict(hidden_size=256, num_hidden_layers=4)
    model = _lm(state_size=16 if smoke else 64, **kw)
    cuts = [2, 3, 4, 5] if smoke else [20, 40, 60, 80]
    callback = CompreSSMCallback(tau=0.25, reduction_steps=cuts)
    args = TrainingArguments(
        output_dir=workdir,
        max_steps=n_steps,
        per_device_train_batch_size=16 if not smoke else 4,
        learning_rate=2e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=device.type != "cuda",
        bf16=device.type == "cuda",
        disable_tqdm=True,
        logging_steps=max(1, n_steps // 4),
        seed=0,
    )
    _peak_and_reset(device)
    t0 = time.perf_counter()
    out = Trainer(model=model, args=args, train_dataset=Copy(), callbacks=[callback]).train()
    return {
        "steps": n_steps,
        "cuts_at": cuts,
        "sizes_after": model.state_sizes(),
        "history_sizes": [h["sizes_after"] for h in getattr(model, "compression_history", [])],
        "train_loss": round(out.training_loss, 4),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_mem_gib": _peak_and_reset(device),
    }


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({'smoke, toy sizes' if report['smoke'] else 'full'})", ""]
    lines += [f"- {k}: {v}" for k, v in report["environment"].items()]
    if "agreement" in report:
        a = report["agreement"]
        lines += ["", "## Agreement (same weights)", "", f"Kernel plan in training: {a['kernel_plan_training']}", ""]
        lines += ["| reference | train logits max abs | grads max rel | eval logits max abs | generate equal |"]
        lines += ["|---|---|---|---|---|"]
        for name in ("cpu", "torch_on_device"):
            r = a[f"vs_{name}"]
            lines.append(
                f"| {name} | {r['train_logits_max_abs']:.2e} | {r['grads_max_rel']:.2e} | "
                f"{r['eval_logits_max_abs']:.2e} | {r['generate_tokens_equal']} |"
            )
    if "timing" in report:
        lines += ["", "## Step time (AdamW, bf16 autocast on CUDA)", ""]
        lines += ["| state size | ms/step (median) | tokens/s | peak GiB | scan | fused |", "|---|---|---|---|---|---|"]
        for r in report["timing"]:
            lines.append(
                f"| {r['state_size']} | {r['ms_per_step_median']} | {r['tokens_per_s']} | {r['peak_mem_gib']} | "
                f"{r['scan']} | {r['fused']} |"
            )
    if "compressssm" in report:
        c = report["compressssm"]
        lines += ["", "## CompreSSM run", ""] + [f"- {k}: {v}" for k, v in c.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.sizes = args.sizes or ([8, 4] if args.smoke else [128, 64, 16, 12])
    args.steps = args.steps or (1 if args.smoke else 6)
    import torch

    from hf_compressssm.compression.atomic_io import write_json_atomic

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("No CUDA device: run with --smoke for the CPU smoke test, or on a GPU machine.")
    report = {"smoke": args.smoke, "environment": _versions()}
    t0 = time.perf_counter()
    if "agreement" not in args.skip:
        report["agreement"] = agreement(device, args.smoke)
    if "timing" not in args.skip:
        report["timing"] = step_times(device, args.sizes, args.steps, args.smoke)
    if "compressssm" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            report["compressssm"] = compressssm_run(device, args.smoke, tmp)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gpu_check.json", report)
    tmp_md = out / f"gpu_check.md.tmp-{os.getpid()}"
    tmp_md.write_text(markdown(report))
    os.replace(tmp_md, out / "gpu_check.md")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
