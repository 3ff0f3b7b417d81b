"""Generation with a returned cache, for every family, against the stock transformers model of the same weights.

Continuing from the ``past_key_values`` that ``generate`` returns (a second chat turn) must give the same tokens as
one uninterrupted ``generate``, and the cache must count the tokens it has seen as the stock model's cache does
(transformers >= 5.25 advances the count on every decode step).
"""

import pytest
import torch
from helpers import random_ids, tiny_lm
from mamba2_helpers import tiny_mamba2_lm


pytestmark = pytest.mark.compat


def _mamba1(sizes):
    return tiny_lm(num_hidden_layers=len(sizes), state_sizes=sizes)


def _mamba2(sizes):
    return tiny_mamba2_lm(num_hidden_layers=len(sizes), state_sizes=sizes)


FAMILIES = {
    "mamba": (_mamba1, "to_mamba"),
    "mamba2": (_mamba2, "to_mamba2"),
}


def _generate(model, ids, **kwargs):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


def _seq_length(cache) -> int | None:
    """The cache's token count, or None where this transformers version counts only attention layers (< 5.25)."""
    try:
        return int(cache.get_seq_length())
    except ValueError:
        return None


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("sizes", [[8, 8], [8, 3]], ids=["uniform", "mixed"])
def test_continue_from_returned_cache(family, sizes):
    build, to_stock = FAMILIES[family]
    model = build(sizes).eval()
    prompt = random_ids(batch=2, length=6)
    with torch.no_grad():
        whole = _generate(model, prompt, max_new_tokens=8).sequences
        first = _generate(model, prompt, max_new_tokens=4)
        cache = first.past_key_values
        # Every token but the last generated one has been fed through the model.
        count = _seq_length(cache)
        assert count in (first.sequences.shape[1] - 1, None)
        second = _generate(model, first.sequences, cache=cache, max_new_tokens=4).sequences
    assert torch.equal(second, whole)

    if len(set(sizes)) == 1:  # the stock model of the same weights counts and continues the same way
        stock = getattr(model, to_stock)().eval()
        with torch.no_grad():
            stock_first = _generate(stock, prompt, max_new_tokens=4)
            assert _seq_length(stock_first.past_key_values) == count
            stock_second = _generate(
                stock, stock_first.sequences, cache=stock_first.past_key_values, max_new_tokens=4
            ).sequences
        assert torch.equal(stock_second, second)
