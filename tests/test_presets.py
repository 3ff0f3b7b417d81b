"""The presets of train.py, benchmark.py and score_study.py: one YAML file each under configs/presets/, one loader
(compressssm_app.presets). The values are those the results were measured with."""

import importlib
import json
import shutil
from pathlib import Path

import pytest

from compressssm_app import presets
from compressssm_app.arguments import PRESETS, TASKS, preset_defaults


REPO = Path(__file__).resolve().parent.parent


def test_every_train_preset_gives_every_task_its_values():
    assert PRESETS == ("default", "tiny", "mamba2")
    for preset in PRESETS:
        for task in TASKS:
            values = preset_defaults(task, preset)
            assert values["output_dir"].endswith("" if preset == "default" else f"-{preset}")
    main = preset_defaults("causal_lm")  # the README's first command
    assert {k: main[k] for k in ("hidden_size", "num_hidden_layers", "state_size", "max_steps", "tau")} == {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "state_size": 64,
        "max_steps": 600,
        "tau": 0.25,
    }
    # mamba2 extends default: the default job's task values, then the Mamba-2 model on top
    mamba2 = preset_defaults("mqar", "mamba2")
    assert (mamba2["state_size"], mamba2["model_type"], mamba2["max_steps"]) == (128, "compressssm_mamba2", 1000)
    assert preset_defaults("causal_lm", "tiny")["reduction_steps"] == [2, 4]


def test_benchmark_presets_are_those_of_the_committed_results():
    """The fingerprint of each preset equals the one its runs in scripts/results/benchmark_runs.jsonl carry (the
    file resumes only with the same settings)."""
    bench = importlib.import_module("benchmark")
    recorded = {}
    for line in (REPO / "scripts" / "results" / "benchmark_runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        recorded[record["group"]] = record["fingerprint"]
    default = bench.default_presets()
    assert list(default) == ["causal_lm", "pixel_classification", "ssm_dominant", "mamba2_lm"]  # the files' order
    for name, fingerprint in recorded.items():
        assert bench.preset_fingerprint(default[name], 1) == fingerprint, name
    quick = bench.quick_presets()
    assert list(quick) == list(default)
    assert all(p.steps == 40 and p.taus == [0.1, 0.3] for p in quick.values())
    assert quick["mamba2_lm"].family == "mamba2" and quick["mamba2_lm"].head_dim == 8
    bench.check_presets(default)
    bench.check_presets(quick)


def test_score_study_presets():
    study = importlib.import_module("score_study")
    assert list(study.PRESETS) == ["default", "quick"]
    assert study.PRESETS["default"] == study.Preset()
    assert study.PRESETS["quick"].steps == 12 and study.PRESETS["quick"].tau_scores == ["h2"]


def test_a_new_preset_is_one_file(tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    shutil.copytree(presets.PRESETS_DIR, folder)
    (folder / "benchmark" / "tiny_lm.yaml").write_text(
        "order: 9\nextends: causal_lm\nhidden_size: 8\nstate_size: 16\nquick: {steps: 4}\n"
    )
    monkeypatch.setattr(presets, "PRESETS_DIR", folder)
    bench = importlib.import_module("benchmark")
    default, quick = bench.default_presets(), bench.quick_presets()
    assert list(default)[-1] == "tiny_lm"
    assert (default["tiny_lm"].task, default["tiny_lm"].hidden_size, default["tiny_lm"].steps) == ("causal_lm", 8, 3000)
    # its own quick values over its values (a `quick` of its own replaces the base's, like every other key)
    assert (quick["tiny_lm"].steps, quick["tiny_lm"].hidden_size, quick["tiny_lm"].block_size) == (4, 8, 256)


def test_bad_preset_files_name_the_problem(tmp_path, monkeypatch):
    bench = importlib.import_module("benchmark")
    folder = tmp_path / "presets"
    (folder / "benchmark").mkdir(parents=True)
    monkeypatch.setattr(presets, "PRESETS_DIR", folder)
    with pytest.raises(presets.PresetError, match="unknown preset 'nope'"):
        presets.load_preset("benchmark", "nope")
    (folder / "benchmark" / "a.yaml").write_text("hidden_sise: 8\n")
    with pytest.raises(presets.PresetError, match="unknown field.*hidden_sise"):
        presets.preset_into(bench.TaskPreset, presets.load_preset("benchmark", "a"))
    (folder / "benchmark" / "a.yaml").write_text("steps: many\n")
    with pytest.raises(presets.PresetError, match="steps: expected int"):
        presets.preset_into(bench.TaskPreset, presets.load_preset("benchmark", "a"))
    (folder / "benchmark" / "a.yaml").write_text("learning_rate: 1\ntaus: [1, 0.5]\n")  # ints where floats go: fine
    p = presets.preset_into(bench.TaskPreset, presets.load_preset("benchmark", "a"))
    assert p.learning_rate == 1.0 and isinstance(p.learning_rate, float) and p.taus == [1.0, 0.5]
    (folder / "benchmark" / "a.yaml").write_text("extends: b\n")
    (folder / "benchmark" / "b.yaml").write_text("extends: a\n")
    with pytest.raises(presets.PresetError, match="circular"):
        presets.load_preset("benchmark", "a")
