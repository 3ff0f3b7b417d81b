"""a --train_file that cannot be read (latin-1 text, an empty file, a .jsonl with a truncated
record), in memory and with --streaming: one error line naming the file and the fix, exit 2, nothing written, and
no model built (a stream's first block is read before the model)."""

import importlib

import pytest

from compressssm_app import parse_arguments


TINY = ["--preset", "tiny", "--max_eval_samples", "2", "--disable_tqdm", "true"]
GOOD = "".join(f"line {i} of a small but good text file\n" for i in range(200))


def _files(folder):
    folder.mkdir()
    (folder / "latin1.txt").write_bytes("Café au lait, naïve façade.\n".encode("latin-1") * 200)
    (folder / "empty.txt").write_bytes(b"")
    records = "".join(f'{{"text": "record {i} of a json lines file"}}\n' for i in range(200))
    (folder / "truncated.jsonl").write_text(records + '{"text": "a record cut sho')
    (folder / "good.txt").write_text(GOOD)
    (folder / "short.txt").write_text("a few words\n" * 3)  # 36 bytes: the 2 held-out blocks of 16, no more
    return folder


CASES = {
    "latin1.txt": "latin1.txt is not UTF-8 text: byte 0xe9 at offset 3 (invalid continuation byte); convert it",
    "empty.txt": "empty.txt is empty; give a file with text",
    "truncated.jsonl": "truncated.jsonl: line 201 is not a valid JSON record (Unterminated string",
}
MODES = {"memory": [], "streaming": ["--streaming"], "streaming+validation": ["--streaming", "--validation_file"]}


@pytest.fixture(scope="module")
def train_script():
    return importlib.import_module("train")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CASES))
def test_unreadable_train_file_is_one_line_before_the_model(tmp_path, monkeypatch, capsys, train_script, name, mode):
    from compressssm_app import run as run_module

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the data was read")

    monkeypatch.setattr(run_module, "build_model", no_model)
    data = _files(tmp_path / "data")
    extra = list(MODES[mode])
    if extra and extra[-1] == "--validation_file":
        extra.append(str(data / "good.txt"))
    out = tmp_path / "out"
    argv = [*TINY, "--train_file", str(data / name), *extra, "--output_dir", str(out)]
    assert train_script.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and CASES[name] in errors[0], err[-3000:]
    assert "Traceback" not in err and not out.exists()


def test_stream_with_no_training_block_left(tmp_path):
    from compressssm_app import UsageError, run_training

    data = _files(tmp_path / "data")
    out = tmp_path / "out"
    args = [*TINY, "--train_file", str(data / "short.txt"), "--streaming", "--block_size", "16"]
    with pytest.raises(UsageError, match="the training stream has no block of 16 tokens after the 2 blocks held out"):
        run_training(*parse_arguments([*args, "--max_eval_samples", "2", "--output_dir", str(out)]))
    assert not out.exists()
