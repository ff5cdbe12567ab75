"""Mixture-of-Depths training signals: the auxiliary losses and per-layer routing statistics."""

from __future__ import annotations

import torch

from modeldefs import Transformer


def routing_losses(model: Transformer) -> torch.Tensor:
    """The auxiliary loss to add to the LM loss, from the model's last (top-k) forward: per routed layer
    the router BCE against top-k membership, weighted by `mod_aux_weight`, plus the predictor's BCE
    (its input is detached, so it trains only the predictor)."""
    weight = model.config.mod_aux_weight
    total = torch.zeros((), device=model.embed.weight.device)
    for block in model.routed_blocks.values():
        if weight > 0:
            total = total + weight * block.routing.router_bce()
        if block.routing.predictor_logits is not None:
            total = total + block.routing.predictor_bce()
    return total


@torch.no_grad()
def routing_stats(model: Transformer) -> dict[str, float]:
    """Per routed layer, from the last (top-k) forward: router/predictor BCE, how often each causal rule
    agrees with top-k, the fraction the causal rule would route, and the router scale's mean/std on
    the tokens that went through; plus the means over layers."""
    stats: dict[str, torch.Tensor] = {}
    for i, block in model.routed_blocks.items():
        r, prefix = block.routing, f"mod/layer{i:02d}"
        stats[f"{prefix}/router_bce"] = r.router_bce()
        stats[f"{prefix}/router_acc"] = ((r.router_logits > 0) == r.topk).float().mean()
        if r.predictor_logits is not None:
            stats[f"{prefix}/predictor_bce"] = r.predictor_bce()
            stats[f"{prefix}/predictor_acc"] = ((r.predictor_logits > 0) == r.topk).float().mean()
        rule = r.predictor_logits if block.causal_rule == "predictor" else r.router_logits
        stats[f"{prefix}/causal_fraction"] = (rule > 0).float().mean()
        scale = block.router_scale(r.router_logits)[r.topk]
        stats[f"{prefix}/scale_mean"] = scale.mean()
        stats[f"{prefix}/scale_std"] = scale.std(correction=0)  # defined for one routed token too
    for name in ("router_acc", "predictor_acc", "causal_fraction"):
        values = [v for k, v in stats.items() if k.endswith("/" + name)]
        if values:
            stats[f"mod/{name}"] = torch.stack(values).mean()
    names = list(stats)
    values = torch.stack([stats[n].float() for n in names]).tolist()  # one device-to-host copy
    return dict(zip(names, values))


def causal_fraction(model: Transformer) -> torch.Tensor:
    """Share of tokens the routed layers processed in the last (inference-mode) forward."""
    return torch.stack([b.routing.selected.float().mean() for b in model.routed_blocks.values()]).mean()
