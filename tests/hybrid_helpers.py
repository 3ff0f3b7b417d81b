"""Tiny hybrid hosts (Mamba-2 layers among attention / MoE layers) shared by the hybrid tests: hidden 32, 4 layers
with one attention layer (index 2), 8 Mamba heads of 8 channels in 2 groups, N = 8, chunk 8 (Granite: 3 experts)."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HybridSpec:
    name: str
    stock_config: str  # class names, imported from transformers / hf_compressssm when used
    stock_model: str
    ours_config: str
    ours_model: str
    values: dict
    mamba_path: str = "mamba"  # where a decoder layer keeps its Mamba-2 module / its attention module
    attention_path: str = "self_attn"

    def _classes(self):
        import transformers

        import hf_compressssm

        return (
            getattr(transformers, self.stock_config),
            getattr(transformers, self.stock_model),
            getattr(hf_compressssm, self.ours_config),
            getattr(hf_compressssm, self.ours_model),
        )

    def stock(self, seed: int = 0, **overrides):
        config_class, model_class, _, _ = self._classes()
        torch.manual_seed(seed)
        return model_class(config_class(**{**self.values, **overrides})).eval()

    def config(self, **overrides):
        return self._classes()[2](**{**self.values, **overrides})

    def ours(self, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return self._classes()[3](self.config(**overrides)).eval()

    @property
    def model_class(self):
        return self._classes()[3]

    @property
    def stock_model_class(self):
        return self._classes()[1]


GRANITE = HybridSpec(
    name="granitemoehybrid",
    stock_config="GraniteMoeHybridConfig",
    stock_model="GraniteMoeHybridForCausalLM",
    ours_config="CompreSSMGraniteMoeHybridConfig",
    ours_model="CompreSSMGraniteMoeHybridForCausalLM",
    values=dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=16,
        shared_intermediate_size=24,
        num_hidden_layers=4,
        layer_types=["mamba", "mamba", "attention", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=8,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_head=8,
        mamba_chunk_size=8,
        num_local_experts=3,
        num_experts_per_tok=2,
        position_embedding_type="rope",
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
)

BAMBA = HybridSpec(
    name="bamba",
    stock_config="BambaConfig",
    stock_model="BambaForCausalLM",
    ours_config="CompreSSMBambaConfig",
    ours_model="CompreSSMBambaForCausalLM",
    values=dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=4,
        attn_layer_indices=[2],
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=8,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_d_head=8,
        mamba_chunk_size=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
)

NEMOTRON_H = HybridSpec(
    name="nemotron_h",
    stock_config="NemotronHConfig",
    stock_model="NemotronHForCausalLM",
    ours_config="CompreSSMNemotronHConfig",
    ours_model="CompreSSMNemotronHForCausalLM",
    values=dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=24,
        layers_block_type=["mamba", "mamba", "attention", "mamba"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        chunk_size=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    mamba_path="mixer",
    attention_path="mixer",
)

HYBRIDS = [GRANITE, BAMBA, NEMOTRON_H]
#: Mamba-layer sizes of the heterogeneous model of the tests (layer 2 is the attention layer).
SIZES = [8, 3, None, 5]
