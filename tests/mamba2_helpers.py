"""Tiny Mamba-2 builders shared by the Mamba-2 tests (hidden 16, 4 heads of 8, 2 groups, N ≤ 8, chunk 8)."""

import torch


def tiny_mamba2_values(**overrides) -> dict:
    values = dict(
        vocab_size=40,
        hidden_size=16,
        num_heads=4,
        head_dim=8,
        n_groups=2,
        num_hidden_layers=2,
        state_size=8,
        chunk_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=True,
    )
    values.update(overrides)
    return values


def tiny_mamba2_config(**overrides):
    from hf_compressssm import CompreSSMMamba2Config

    return CompreSSMMamba2Config(**tiny_mamba2_values(**overrides))


def tiny_mamba2_lm(seed: int = 0, **overrides):
    from hf_compressssm import CompreSSMMamba2ForCausalLM

    torch.manual_seed(seed)
    return CompreSSMMamba2ForCausalLM(tiny_mamba2_config(**overrides))


def stock_mamba2_lm(seed: int = 0, **overrides):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    return Mamba2ForCausalLM(Mamba2Config(**tiny_mamba2_values(**overrides)))
