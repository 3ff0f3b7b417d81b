"""Small shared builders for the tests (tiny sizes: hidden ≤ 64, L ≤ 64, N ≤ 16)."""

import torch


def tiny_config(**overrides):
    from hf_compressssm import CompreSSMMambaConfig

    values = dict(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        state_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=True,
    )
    values.update(overrides)
    return CompreSSMMambaConfig(**values)


def tiny_lm(seed: int = 0, **overrides):
    from hf_compressssm import CompreSSMMambaForCausalLM

    torch.manual_seed(seed)
    return CompreSSMMambaForCausalLM(tiny_config(**overrides))


def random_ids(batch: int = 2, length: int = 12, vocab: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def cached_decode_logits(model, ids: torch.Tensor, prefill: int):
    """Decode ``ids`` (b, L) through the cache: a prefill of its first ``prefill`` tokens with ``use_cache=True``,
    then one cached forward per token. Returns the last-position logits of each forward, (b, L - prefill, V), which
    a full forward gives at positions ``prefill - 1 .. L - 2``, and the prefill's output (its cache)."""
    first = model(ids[:, :prefill], use_cache=True)
    out, steps = first, [first.logits[:, -1]]
    for t in range(prefill, ids.shape[1] - 1):
        out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1), first


class Blocks(torch.utils.data.Dataset):
    """``n`` random token blocks of ``length`` (labels = inputs) for Trainer runs."""

    def __init__(self, n: int = 64, length: int = 16, seed: int = 1):
        self.ids = random_ids(batch=n, length=length, seed=seed)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, **overrides):
    """Small, deterministic CPU `TrainingArguments` (12 steps of 4 sequences, no saving, no reports)."""
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(out),
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=100,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def optimizer_params(trainer):
    """The parameters the Trainer's optimizer holds, in order."""
    return [p for g in trainer.optimizer.param_groups for p in g["params"]]


# Python source to put at the top of a subprocess script so that it cannot import hf_compressssm, however the
# package is installed (editable finder, site-packages or the repo on sys.path): what a user without it sees.
BLOCK_PACKAGE = """
import importlib.abc, importlib.util, sys
class _BlockHfCompressssm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_compressssm" or name.startswith("hf_compressssm."):
            raise ModuleNotFoundError("hf_compressssm is blocked in this process", name=name)
        return None
sys.meta_path.insert(0, _BlockHfCompressssm())
try:
    import hf_compressssm
    raise AssertionError("hf_compressssm must not be importable here")
except ModuleNotFoundError:
    pass
"""
