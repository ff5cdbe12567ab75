"""Mixture-of-Depths training signals: auxiliary losses and per-layer routing statistics."""

from __future__ import annotations

import torch

from modeldefs import Transformer


def routing_losses(model: Transformer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The auxiliary loss to add to the LM loss, and statistics, from the model's last training forward.

    Per routed layer: BCE of the router logits against top-k membership (weighted by
    `mod_aux_weight`), the predictor's BCE (its input is detached, so it trains only the predictor),
    how often each causal rule agrees with top-k, the fraction the causal rule would route, and the
    mean/std of the router scale on the tokens that went through.
    """
    weight = model.config.mod_aux_weight
    total = torch.zeros((), device=model.embed.weight.device)
    stats: dict[str, torch.Tensor] = {}
    for i, block in model.routed_blocks.items():
        r = block.routing
        prefix = f"mod/layer{i:02d}"
        router_bce = r.router_bce()
        if weight > 0:
            total = total + weight * router_bce
        stats[f"{prefix}/router_bce"] = router_bce.detach()
        stats[f"{prefix}/router_acc"] = ((r.router_logits > 0) == r.topk).float().mean()
        if r.predictor_logits is not None:
            predictor_bce = r.predictor_bce()
            total = total + predictor_bce
            stats[f"{prefix}/predictor_bce"] = predictor_bce.detach()
            stats[f"{prefix}/predictor_acc"] = ((r.predictor_logits > 0) == r.topk).float().mean()
        rule = r.predictor_logits if block.causal_rule == "predictor" else r.router_logits
        stats[f"{prefix}/causal_fraction"] = (rule > 0).float().mean()
        scale = block.router_scale(r.router_logits.detach())[r.topk]
        stats[f"{prefix}/scale_mean"] = scale.mean()
        stats[f"{prefix}/scale_std"] = scale.std()
    for name in ("router_acc", "predictor_acc", "causal_fraction"):
        values = [v for k, v in stats.items() if k.endswith("/" + name)]
        if values:
            stats[f"mod/{name}"] = torch.stack(values).mean()
    return total, stats


def causal_fraction(model: Transformer) -> torch.Tensor:
    """Share of tokens the routed layers processed in the last (inference-mode) forward."""
    return torch.stack([b.routing.selected.float().mean() for b in model.routed_blocks.values()]).mean()
