"""Module surgery and optimizer carry-over, checked against the tensors before the cut."""

import pytest
import torch
from helpers import random_ids, tiny_lm
from transformers.optimization import Adafactor

from hf_compressssm import CompreSSMMambaForCausalLM
from hf_compressssm.compression.surgery import SurgeryError, shrink_mixers
from hf_compressssm.families import find_mixers
from hf_compressssm.families.mamba import kept_x_proj_rows


def _train_steps(model, optimizer, steps=2):
    ids = random_ids(batch=2, length=10)
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()


def _optimizer(kind, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, foreach=False)
    if kind == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if kind == "adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    if kind == "adafactor":
        return Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False, warmup_init=False)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["adamw", "adamw_foreach", "adamw_fused", "sgd", "adafactor"])
def test_cut_slices_parameters_and_optimizer_state(kind):
    model = tiny_lm(state_sizes=[8, 6])
    optimizer = _optimizer(kind, model.parameters())
    _train_steps(model, optimizer)
    mixer = find_mixers(model)[0]
    keep = torch.tensor([1, 4, 6])
    rows = kept_x_proj_rows(mixer, keep)
    old_A, old_x = mixer.A_log.detach().clone(), mixer.x_proj.weight.detach().clone()
    old_states = {
        name: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
        for name, p in (("A", mixer.A_log), ("x", mixer.x_proj.weight))
    }
    untouched = model.backbone.layers[1].mixer.A_log
    untouched_state = {k: torch.as_tensor(v).clone() for k, v in optimizer.state[untouched].items()}

    shrink_mixers(model, {0: keep}, optimizer)

    assert model.state_sizes() == [3, 6] and model.config.state_sizes == [3, 6]
    assert mixer.ssm_state_size == 3
    assert torch.equal(mixer.A_log, old_A[:, keep])
    assert torch.equal(mixer.x_proj.weight, old_x[rows])
    # The optimizer holds exactly the model's parameters, in place of the old ones.
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == len(list(model.parameters()))
    assert {id(p) for p in opt_params} == {id(p) for p in model.parameters()}
    for name, param, index, dim in (("A", mixer.A_log, keep, 1), ("x", mixer.x_proj.weight, rows, 0)):
        new_state = optimizer.state[param]
        for key, old in old_states[name].items():
            new = new_state[key]
            if not torch.is_tensor(old) or old.dim() == 0:
                assert torch.equal(torch.as_tensor(new), torch.as_tensor(old)), key  # step counts kept
            elif old.shape == (old_A if name == "A" else old_x).shape:
                assert torch.equal(new, old.index_select(dim, index)), key
            elif key == "exp_avg_sq_row" and dim == 0:
                assert torch.equal(new, old[index]), key
            elif key == "exp_avg_sq_col" and dim == 1:
                assert torch.equal(new, old[..., index]), key
            else:
                assert new.shape[0] in (old.shape[0], index.numel()), key
    for key, value in untouched_state.items():
        assert torch.equal(torch.as_tensor(optimizer.state[untouched][key]), value)
    # Training continues.
    _train_steps(model, optimizer, steps=1)
    assert torch.isfinite(mixer.A_log).all()


def test_unknown_optimizer_state_is_dropped_with_warning():
    class MyOpt(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p]["buf"] = p.grad.clone()
                        p.data.add_(p.grad, alpha=-group["lr"])

    model = tiny_lm()
    optimizer = MyOpt(model.parameters())
    _train_steps(model, optimizer, 1)
    mixer = find_mixers(model)[1]
    other = model.backbone.norm_f.weight
    with pytest.warns(UserWarning, match="don't know the state layout of optimizer MyOpt"):
        shrink_mixers(model, {1: torch.tensor([0, 2])}, optimizer)
    assert mixer.A_log not in optimizer.state or not optimizer.state[mixer.A_log]
    assert "buf" in optimizer.state[other]


def test_cut_is_atomic_when_commit_fails(monkeypatch):
    model = tiny_lm(state_sizes=[8, 6])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_steps(model, optimizer)
    before_params = {n: p for n, p in model.named_parameters()}
    before_values = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    groups_before = [list(g["params"]) for g in optimizer.param_groups]

    def boom(self, sizes):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(type(model.config), "check_state_sizes", boom)
    with pytest.raises(SurgeryError, match="injected failure"):
        shrink_mixers(model, {0: torch.tensor([0, 1]), 1: torch.tensor([2, 3, 4])}, optimizer)
    monkeypatch.undo()
    assert model.config.state_sizes == [8, 6] and model.state_sizes() == [8, 6]
    assert [m.ssm_state_size for m in find_mixers(model)] == [8, 6]
    for n, p in model.named_parameters():
        assert p is before_params[n] and torch.equal(p, before_values[n])
    assert [list(g["params"]) for g in optimizer.param_groups] == groups_before
    for p, s in optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, before_state[id(p)][k])
    ids = random_ids()
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_bad_cuts_raise_before_changing_anything():
    model = tiny_lm(state_sizes=[8, 6])
    params = [p for p in model.parameters()]
    with pytest.raises(SurgeryError, match=r"in \[0, 6\)"):
        shrink_mixers(model, {1: torch.tensor([0, 6])})
    with pytest.raises(SurgeryError, match="distinct"):
        shrink_mixers(model, {0: torch.tensor([1, 1])})
    with pytest.raises(SurgeryError, match="layer 5 does not exist"):
        shrink_mixers(model, {5: torch.tensor([0])})
    assert [p for p in model.parameters()] == params and model.config.state_sizes == [8, 6]


def test_stock_model_needs_conversion():
    from transformers import MambaConfig, MambaForCausalLM

    stock = MambaForCausalLM(MambaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_size=8))
    with pytest.raises(SurgeryError, match="from_mamba"):
        shrink_mixers(stock, {0: torch.tensor([0, 1])})
    converted = CompreSSMMambaForCausalLM.from_mamba(stock)
    shrink_mixers(converted, {0: torch.tensor([0, 1])})
    assert converted.state_sizes() == [2, 8]


def test_cut_model_equals_model_with_zeroed_states():
    """Dropping states whose B rows are zero leaves the outputs unchanged (they contribute nothing)."""
    model = tiny_lm(state_sizes=[8, 8]).eval()
    mixer = find_mixers(model)[0]
    drop = [1, 5, 6]
    with torch.no_grad():
        for n in drop:
            mixer.x_proj.weight[mixer.time_step_rank + n].zero_()  # B row of state n
    ids = random_ids()
    with torch.no_grad():
        before = model(ids).logits
    keep = torch.tensor([i for i in range(8) if i not in drop])
    shrink_mixers(model, {0: keep})
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
