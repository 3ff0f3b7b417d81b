"""The command lines: grouped help with the preset's defaults, no prefix abbreviations, a missing model folder
rejected before anything heavy is imported, the launcher check, tokenizers loaded without a remote-code prompt."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compressssm_app import UsageError, build_parser, parse_arguments
from compressssm_app.launcher import launcher_mismatch, requested_processes


REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def _run(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


@pytest.mark.parametrize("argv", [["--max_step", "10"], ["--learning_rat", "0.1"], ["--tau", "0.1", "--stream"]])
def test_prefix_abbreviations_are_rejected(argv):
    with pytest.raises(UsageError, match="unknown argument") as info:
        parse_arguments(argv)
    assert "did you mean" in str(info.value)
    model_args, data_args, training_args, comp_args = parse_arguments(["--max_steps", "10"])
    assert training_args.max_steps == 10 and comp_args.tau == 0.25


def test_help_groups_package_arguments_first_with_preset_defaults():
    proc = _run(SCRIPTS / "train.py", "--task", "mqar", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    titles = ["\nModel:", "\nData:", "\nCompreSSM compression:", "\nTraining (transformers.TrainingArguments):"]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions), "package groups come before the Trainer's arguments"
    assert len(text.splitlines()[0]) < 120, "a one-line usage, not every flag"

    def default_of(flag: str) -> str:
        block = text[text.index(f"  {flag} ") :]
        return block[block.index("(default:") + 9 : block.index(")", block.index("(default:"))].strip()

    # the mqar preset's values, not the dataclasses' own defaults (4 layers, 5e-05, -1 steps)
    assert default_of("--max_steps") == "1000"
    assert default_of("--num_hidden_layers") == "2"
    assert default_of("--learning_rate") == "0.002"
    assert default_of("--seq_len") == "128"
    assert default_of("--tau") == "0.05"
    assert default_of("--ddp_find_unused_parameters") == "False"


def test_train_script_rejects_an_abbreviation_with_exit_2(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", SCRIPTS / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--preset", "tiny", "--max_step", "10", "--output_dir", str(tmp_path / "o")]) == 2
    assert "--max_step (did you mean --max_steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_parser_order_is_model_data_compression_training():
    parser = build_parser()
    names = [dtype.__name__ for dtype in parser.dataclass_types]
    assert names == ["ModelArguments", "DataArguments", "CompressionArguments", "TrainingArguments"]
    assert parser.allow_abbrev is False


@pytest.mark.parametrize("model", ["{tmp}/missing", "outputs/does-not-exist-{name}", "./nope", "a/b/c"])
def test_evaluate_missing_folder_fails_at_once(tmp_path, model):
    """Exit 2 with a clear message before torch/transformers are imported and without any Hub lookup (the
    endpoint points at a closed port: a lookup would fail differently and slowly)."""
    arg = model.format(tmp=tmp_path, name=tmp_path.name)
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    proc = _run("-X", "importtime", SCRIPTS / "evaluate_model.py", arg, env=env)
    assert proc.returncode == 2
    assert f"model folder {arg} does not exist" in proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers", "huggingface_hub", "hf_compressssm"} & imported


def test_evaluate_rejects_abbreviations():
    proc = _run(SCRIPTS / "evaluate_model.py", str(REPO), "--no_spee")
    assert proc.returncode == 2 and "unrecognized arguments: --no_spee" in proc.stderr


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        (["python", "/x/accelerate", "launch", "--cpu", "--num_processes", "2", "train.py", "--num_processes", "9"], 2),
        (["accelerate", "launch", "--num_processes=3", "scripts/train.py"], 3),
        (["python", "-m", "torch.distributed.run", "--nproc-per-node", "4", "scripts/train.py"], 4),
        (["python", "scripts/train.py", "--num_processes", "2"], None),  # no launcher: the script's own flags
        (["bash", "-c", "x"], None),
    ],
)
def test_requested_processes(cmd, expected):
    assert requested_processes(cmd, "scripts/train.py") == expected


def test_requested_processes_from_the_shipped_config():
    config = REPO / "configs" / "accelerate_cpu_2proc.yaml"
    cmd = ["accelerate", "launch", "--config_file", str(config), "scripts/train.py"]
    assert requested_processes(cmd, "scripts/train.py") == 2
    assert launcher_mismatch(2, "scripts/train.py") is None


def test_saved_tokenizer_loads_without_a_remote_code_prompt(tmp_path):
    from helpers import tiny_lm

    from compressssm_app.sources import build_byte_tokenizer

    tiny_lm(vocab_size=257).save_pretrained(tmp_path)
    build_byte_tokenizer().save_pretrained(tmp_path)
    with_package = (
        "import hf_compressssm; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(tmp_path)!r}); print(len(t), t('ab')['input_ids'])"
    )
    without_package = (
        "from transformers import PreTrainedTokenizerFast; "
        f"t = PreTrainedTokenizerFast.from_pretrained({str(tmp_path)!r}); print(len(t), t('ab')['input_ids'])"
    )
    for code in (with_package, without_package):
        proc = _run("-c", code)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "257 [97, 98]"
