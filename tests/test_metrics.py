"""The shipped `evaluate` modules: offline loading by path, values against hand computations, the Trainer hooks."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from hf_compressssm import metrics


pytestmark = pytest.mark.compat


REPO = Path(__file__).resolve().parent.parent


def test_accuracy_hand_computed():
    result = metrics.load("accuracy").compute(predictions=[0, 1, 2, 2, 1], references=[0, 1, 1, 2, 0])
    assert result == {"accuracy": pytest.approx(3 / 5)}
    weighted = metrics.load("accuracy").compute(predictions=[1, 0], references=[1, 1], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)


def test_token_accuracy_hand_computed():
    # causal shift: prediction at t is compared with the label at t + 1; -100 is not scored
    predictions = [[5, 7, 9, 4], [1, 2, 3, 0]]
    references = [[-100, 5, -100, 9], [-100, -100, 3, 3]]
    # row 0: pairs (5,5) ok, (7,-100) skip, (9,9) ok -> 2/2; row 1: (2,3) wrong, (3,3) ok -> 1/2
    result = metrics.load("token_accuracy").compute(predictions=predictions, references=references)
    assert result == {"accuracy": pytest.approx(3 / 4), "scored": 4}
    unshifted = metrics.load("token_accuracy").compute(predictions=[[1, 2]], references=[[1, 3]], shift=False)
    assert unshifted["accuracy"] == pytest.approx(0.5)
    assert math.isnan(metrics.load("token_accuracy").compute(predictions=[[1]], references=[[-100]])["accuracy"])


def test_perplexity_hand_computed_and_against_cross_entropy():
    result = metrics.load("perplexity").compute(nll_sums=[2.0, 4.0], token_counts=[1, 3])
    assert result["loss"] == pytest.approx(1.5) and result["perplexity"] == pytest.approx(math.exp(1.5))
    assert result["tokens"] == 4
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[1, 2:] = -100
    sums = metrics.token_nll_sums(logits, labels)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    out = metrics.load("perplexity").compute(nll_sums=sums[:, 0], token_counts=sums[:, 1].long())
    assert out["loss"] == pytest.approx(float(reference), rel=1e-6)
    assert out["tokens"] == int((labels[:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="at least one scored token"):
        metrics.load("perplexity").compute(nll_sums=[0.0], token_counts=[0])


def test_trainer_hooks():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([1, 1, 2])
    pred = EvalPrediction(predictions=metrics.argmax_logits(logits, torch.as_tensor(labels)).numpy(), label_ids=labels)
    assert metrics.accuracy_from_eval_pred(pred) == {"accuracy": pytest.approx(2 / 3)}
    assert metrics.accuracy_from_eval_pred(EvalPrediction(logits.numpy(), labels))["accuracy"] == pytest.approx(2 / 3)
    seq_logits = torch.randn(2, 5, 7)
    seq_labels = torch.randint(0, 7, (2, 5))
    sums = metrics.token_nll_sums(seq_logits, seq_labels).numpy()
    ppl = metrics.perplexity_from_eval_pred(EvalPrediction(sums, seq_labels.numpy()))
    ce = torch.nn.functional.cross_entropy(seq_logits[:, :-1].reshape(-1, 7), seq_labels[:, 1:].reshape(-1))
    assert ppl["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-6)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.path_of("bleu")


def test_modules_load_offline_by_path():
    """In a fresh process with the Hub unreachable (offline mode, no proxy), evaluate.load of the shipped folder."""
    code = (
        "import evaluate, hf_compressssm.metrics as m; "
        "print(evaluate.load(str(m.path_of('accuracy'))).compute(predictions=[1, 1], references=[1, 0]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "{'accuracy': 0.5}"


def test_evaluate_quality_uses_the_modules():
    """evaluate_quality on a tiny LM equals the hand-computed token-mean cross-entropy."""
    from helpers import tiny_lm

    from compressssm_app.evaluation import evaluate_quality

    model = tiny_lm()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (5, 12), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    result = evaluate_quality(model, data, "causal_lm", batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    assert result["loss"] == pytest.approx(float(ce), rel=1e-5) and result["tokens"] == 5 * 11
