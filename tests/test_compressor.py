"""`Compressor` without the Trainer: in a plain PyTorch loop it makes the same cuts and gives the same weights as
`CompreSSMCallback` in a `Trainer` on the same batches (both families), resumes exactly from its `state_dict`, and the
loop shown in its module docstring runs as written."""

import re
import textwrap

import pytest
import torch
from helpers import random_ids, tiny_lm, training_args
from mamba2_helpers import tiny_mamba2_lm
from transformers import Trainer

import hf_compressssm.compression.compressor as compressor_module
from hf_compressssm import CompreSSMCallback, Compressor


STEPS, BATCH = 12, 4
CUTS = dict(tau=0.3, reduction_steps=[4, 8], calibration_batches=3)
BUILDERS = {"mamba": lambda: tiny_lm(seed=3, state_sizes=[8, 8]), "mamba2": lambda: tiny_mamba2_lm(seed=3)}


def _examples() -> list[dict]:
    ids = random_ids(batch=STEPS * BATCH, length=16, seed=5)
    return [{"input_ids": row, "labels": row} for row in ids]


def _batches() -> list[dict]:
    examples = _examples()
    return [
        {k: torch.stack([e[k] for e in examples[i : i + BATCH]]) for k in examples[0]}
        for i in range(0, len(examples), BATCH)
    ]


class _InOrder(torch.utils.data.IterableDataset):
    """The examples in their order (the Trainer does not shuffle an iterable dataset)."""

    def __iter__(self):
        return iter(_examples())


def _untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def _optimizer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _plain_loop(model, compressor: Compressor, optimizer, steps: range) -> list:
    reports = []
    model.train()
    for step, batch in zip(steps, _batches()[steps.start - 1 : steps.stop - 1]):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        report = compressor.step(model, optimizer, step)
        if report is not None:
            reports.append(report)
    return reports


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_plain_loop_equals_the_callback_in_a_trainer(family, tmp_path):
    trained = BUILDERS[family]()
    trained.accepts_loss_kwargs = False  # the Trainer takes the model's own mean loss, as the plain loop does
    args = training_args(tmp_path, max_steps=STEPS, per_device_train_batch_size=BATCH, max_grad_norm=0.0)
    trainer = Trainer(
        model=trained,
        args=args,
        train_dataset=_InOrder(),
        optimizers=_optimizer(trained),
        callbacks=[CompreSSMCallback(**CUTS)],
    )
    trainer.train()

    plain = BUILDERS[family]()
    compressor = Compressor(**CUTS)
    optimizer, _ = _optimizer(plain)
    compressor.start(plain, max_steps=STEPS)
    reports = _plain_loop(plain, compressor, optimizer, range(1, STEPS + 1))
    compressor.stop()

    assert [r.step for r in reports] == [4, 8]
    assert _untimed(plain.compression_history) == _untimed(trained.compression_history)
    assert plain.config.compression == trained.config.compression
    assert plain.state_sizes() == trained.state_sizes() != [8, 8]
    mine, theirs = plain.state_dict(), trained.state_dict()
    assert list(mine) == list(theirs)
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_state_dict_resumes_a_plain_loop_exactly(tmp_path):
    def run(steps, model, compressor, optimizer, start_step=0):
        compressor.start(model, max_steps=STEPS, step=start_step)
        _plain_loop(model, compressor, optimizer, steps)

    full = BUILDERS["mamba"]()
    optimizer, _ = _optimizer(full)
    run(range(1, STEPS + 1), full, Compressor(**CUTS), optimizer)

    first = BUILDERS["mamba"]()
    compressor, (optimizer, _) = Compressor(**CUTS), _optimizer(first)
    run(range(1, 7), first, compressor, optimizer)
    first.save_pretrained(tmp_path / "at6")
    saved_compressor, saved_optimizer = compressor.state_dict(), optimizer.state_dict()
    compressor.stop()

    resumed = type(first).from_pretrained(tmp_path / "at6")
    compressor, (optimizer, _) = Compressor(**CUTS), _optimizer(resumed)
    optimizer.load_state_dict(saved_optimizer)
    compressor.load_state_dict(saved_compressor)
    run(range(7, STEPS + 1), resumed, compressor, optimizer, start_step=6)
    compressor.stop()

    assert [h["step"] for h in resumed.compression_history] == [4, 8]
    assert _untimed(resumed.compression_history) == _untimed(full.compression_history)
    for name, tensor in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def _docstring_loop() -> str:
    """The example loop of the `Compressor` module docstring, as written there."""
    doc = compressor_module.__doc__
    block = re.search(r"::\n\n((?:    .*\n|\n)+)", doc).group(1)
    return textwrap.dedent(block)


def test_the_documented_plain_loop_runs_as_written(tmp_path, monkeypatch, capsys):
    code = _docstring_loop()
    assert 12 <= len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    model = tiny_lm(seed=1, state_sizes=[8, 8])
    exec(code, {"model": model, "batches": _batches()})
    assert [h["step"] for h in model.compression_history] == [4, 8]
    assert (tmp_path / "compressed" / "config.json").is_file()
    assert "->" in capsys.readouterr().out
