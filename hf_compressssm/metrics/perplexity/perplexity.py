"""Perplexity of a language model from its summed token losses (an offline ``evaluate`` module)."""

import math

import datasets
import evaluate
import numpy as np


_DESCRIPTION = (
    "Perplexity = exp(total negative log-likelihood / number of scored tokens), from per-sequence sums of the token "
    "losses (natural log) and token counts, so sequences of any length are weighted by their tokens. Unlike the "
    "Hub's `perplexity` metric, it does not load a model: the caller computes the losses (e.g. the Trainer's "
    "preprocess_logits_for_metrics)."
)
_KWARGS_DESCRIPTION = """
Args:
    nll_sums (list of float): summed negative log-likelihood (nats) of the scored tokens of each sequence.
    token_counts (list of int): number of scored tokens of each sequence.
Returns:
    loss (float): mean negative log-likelihood per token (nats).
    perplexity (float): exp(loss).
    tokens (int): number of scored tokens.
"""


class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nll_sums": datasets.Value("float64"), "token_counts": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll_sums, token_counts) -> dict:
        tokens = int(np.sum(token_counts))
        if tokens <= 0:
            raise ValueError("perplexity needs at least one scored token")
        loss = float(np.sum(np.asarray(nll_sums, dtype=np.float64)) / tokens)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
