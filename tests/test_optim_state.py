"""Optimizer state keyed by parameter name (`training.optim_state`): a round trip restores every moment on
its own parameter, and states written before (numbered) or for another model are handled."""

from __future__ import annotations

import pytest
import torch

from training.optim_state import by_name, by_number


def stepped_adamw() -> tuple[torch.nn.Module, torch.optim.Optimizer, list[str]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    named = dict(model.named_parameters())
    groups = [[n for n, p in named.items() if p.dim() >= 2], [n for n, p in named.items() if p.dim() < 2]]
    optimizer = torch.optim.AdamW([{"params": [named[n] for n in g]} for g in groups])
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, groups[0] + groups[1]  # the order the optimizer numbers its parameters


def test_a_round_trip_puts_every_moment_back_on_its_parameter():
    model, optimizer, order = stepped_adamw()
    named = by_name(optimizer.state_dict(), order)
    params = dict(model.named_parameters())
    assert set(named["state"]) == set(params)
    for name, state in named["state"].items():
        assert state["exp_avg"].shape == params[name].shape
        torch.testing.assert_close(state["exp_avg"], optimizer.state[params[name]]["exp_avg"], rtol=0, atol=0)
    assert by_number(named, order) == optimizer.state_dict()


def test_numbered_state_from_before_passes_through_and_a_foreign_one_is_refused():
    _, optimizer, order = stepped_adamw()
    numbered = optimizer.state_dict()
    assert by_number(numbered, order) is numbered
    with pytest.raises(ValueError, match="parameters this model lacks"):
        by_number(by_name(numbered, order), [n.replace("0.", "9.") for n in order])
