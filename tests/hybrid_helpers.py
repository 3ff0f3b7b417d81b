"""Tiny hybrid hosts (Mamba-2 layers among attention / MoE layers) shared by the hybrid tests: hidden 32, 4 layers
with one attention layer (index 2; Zamba2: two shared-attention "hybrid" layers, all four with a Mamba layer),
8 Mamba heads of 8 channels in 2 groups, N = 8, chunk 8 (Granite: 3 experts)."""

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
    #: Per-layer state sizes of the heterogeneous model of the tests (None: a layer without a Mamba layer).
    sizes: tuple = (8, 3, None, 5)
    #: A checkpoint key of an attention weight.
    attention_key: str = "model.layers.2.self_attn.q_proj.weight"

    @property
    def ssm_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.sizes) if s is not None]

    @property
    def compact(self) -> list[int]:
        """The Mamba layers' sizes (``config.state_sizes``)."""
        return [s for s in self.sizes if s is not None]

    def full(self, sizes) -> list:
        """Per-layer list from one size (or one per Mamba layer), None at the other layers."""
        sizes = iter(sizes) if isinstance(sizes, (list, tuple)) else iter([sizes] * len(self.ssm_layers))
        return [None if s is None else next(sizes) for s in self.sizes]

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
    attention_key="model.layers.2.mixer.q_proj.weight",
)

ZAMBA2 = HybridSpec(
    name="zamba2",
    stock_config="Zamba2Config",
    stock_model="Zamba2ForCausalLM",
    ours_config="CompreSSMZamba2Config",
    ours_model="CompreSSMZamba2ForCausalLM",
    values=dict(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],  # both hybrid layers share one attention block
        num_mem_blocks=1,
        adapter_rank=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_mamba_heads=8,
        mamba_headdim=8,
        mamba_ngroups=2,
        mamba_d_state=8,
        chunk_size=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    sizes=(8, 3, 6, 5),  # every Zamba2 layer has a Mamba layer
    attention_key="model.layers.1.shared_transformer.self_attn.q_proj.weight",
)

HYBRIDS = [GRANITE, BAMBA, NEMOTRON_H, ZAMBA2]
