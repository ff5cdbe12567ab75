"""`RoutingMonitor`: Mixture-of-Depths routing statistics and token x layer heatmaps (PNG and W&B)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from training.errors import ConfigError
from training.quietstar_lm import QuietStarLM
from training.routing import routing_stats
from training.steps import ends_optimizer_step


class RoutingMonitor(L.Callback):
    """Watches the routed layers of a Mixture-of-Depths model during training.

    Every `stats_every_n_steps` steps it writes `routing_stats` (per layer: router/predictor BCE and
    agreement with top-k, fraction routed by the causal rule, router-scale mean/std) to the loggers,
    on the rows of `train/loss`. It counts steps as Lightning's logging does (step n, n = 1, 2, ...,
    when n is a multiple), so with a multiple of `log_every_n_steps` it reads the GPU only on steps that
    read the loss anyway and the steps between queue work without waiting for it. After the first step
    and every `heatmap_every_n_steps` steps it draws which of the first `max_tokens` tokens of one training
    sequence each routed layer processed — by top-k (what training did, shaded by the router scale)
    and by the causal rule (what inference would do) — to `<log_dir>/routing/step_NNNNNN.png` (the first
    logger's version folder, so runs in one folder keep their own), and the histograms of every layer's
    router logits over the batch, top-k tokens apart from the others, to `router_logits_step_NNNNNN.png`;
    both also go to W&B when a WandbLogger is attached, the logits as W&B histograms too. Nothing happens
    for a dense model; a Quiet-STaR module is refused (no top-k routing).
    """

    def __init__(self, stats_every_n_steps: int = 10, heatmap_every_n_steps: int = 100, max_tokens: int = 64) -> None:
        """
        Args:
            stats_every_n_steps: optimizer steps between statistics.
            heatmap_every_n_steps: optimizer steps between pictures.
            max_tokens: tokens of the sequence shown (the x axis).
        """
        if min(stats_every_n_steps, heatmap_every_n_steps, max_tokens) < 1:
            raise ConfigError("RoutingMonitor stats_every_n_steps, heatmap_every_n_steps and max_tokens must be "
                              f"positive (got {stats_every_n_steps}, {heatmap_every_n_steps}, {max_tokens})")
        self.stats_every_n_steps = stats_every_n_steps
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.max_tokens = max_tokens

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, QuietStarLM):
            raise ConfigError("RoutingMonitor draws top-k routing, which Quiet-STaR training does not use (its Mixture-"
                              "of-Depths layers route by the causal rule; val/causal_fraction is logged): drop the "
                              "callback from trainer.callbacks")
        # trainer.log_dir is a broadcast from rank 0: read here, on every rank, not in the rank-0-only hook
        self._folder = Path(trainer.log_dir) / "routing"

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        blocks = pl_module.model.routed_blocks
        if not blocks or not ends_optimizer_step(trainer, batch_idx):  # a micro-batch that only accumulates
            return
        step = trainer.global_step - 1  # the optimizer step this batch completed, as train/loss is logged
        if trainer.global_step % self.stats_every_n_steps == 0:
            stats = routing_stats(pl_module.model)
            for logger in trainer.loggers:
                logger.log_metrics(stats, step=step)
        if step > 0 and trainer.global_step % self.heatmap_every_n_steps != 0:
            return
        n = min(self.max_tokens, batch["input_ids"].size(1))
        top_k, causal = [], []
        for block in blocks.values():
            r = block.routing
            scale = block.router_scale(r.router_logits[0, :n].detach())
            top_k.append(torch.where(r.topk[0, :n], scale, torch.zeros_like(scale)).float().cpu())
            rule = r.predictor_logits if block.causal_rule == "predictor" else r.router_logits
            causal.append((rule[0, :n] > 0).float().cpu())
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        ids = batch["input_ids"][0, :n].tolist()
        labels = [tokenizer.decode([t]) for t in ids] if tokenizer is not None else [str(t) for t in ids]
        path = self._folder / f"step_{step:06d}.png"
        draw(torch.stack(top_k), torch.stack(causal), list(blocks), labels, path, step)
        logits = {i: (b.routing.router_logits.detach().float().cpu(), b.routing.topk.cpu()) for i, b in blocks.items()}
        histogram_path = self._folder / f"router_logits_step_{step:06d}.png"
        draw_router_logits(logits, histogram_path, step)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_image(key="mod/routing_heatmap", images=[str(path)], step=step)
                logger.log_image(key="mod/router_logits", images=[str(histogram_path)], step=step)
                histograms = {f"mod/layer{i:02d}/router_logits": wandb.Histogram(values.numpy())
                              for i, (values, _) in logits.items()}
                logger.experiment.log({**histograms, "trainer/global_step": step})


def draw(top_k: torch.Tensor, causal: torch.Tensor, layers: list[int], tokens: list[str], path: Path,
         step: int) -> None:
    """Two stacked heatmaps (routed layers x tokens) written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.22 * len(tokens)), 1.2 + 0.5 * len(layers)), sharex=True)
    panels = [(top_k, "top-k (training), shaded by router scale", 2.0), (causal, "causal rule (inference)", 1.0)]
    for ax, (values, title, vmax) in zip(axes, panels):
        image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    axes[-1].set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=6)
    fig.suptitle(f"Mixture-of-Depths routing at step {step}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_router_logits(logits: dict[int, tuple[torch.Tensor, torch.Tensor]], path: Path, step: int) -> None:
    """Per routed layer, the histogram of its router logits over a batch, for the tokens top-k selected and
    for the others, with the causal rule's threshold (logit 0) marked; written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = min(4, len(logits))
    rows = -(-len(logits) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (layer, (values, topk)) in zip(axes.flat, logits.items()):
        bins = torch.histogram(values.flatten(), bins=40).bin_edges.numpy()
        ax.hist(values[topk].numpy(), bins=bins, alpha=0.6, label="top-k")
        ax.hist(values[~topk].numpy(), bins=bins, alpha=0.6, label="skipped")
        ax.axvline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"layer {layer}: {(values > 0).float().mean():.0%} above 0", fontsize=8)
        ax.set_xlabel("router logit", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(logits):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"Router logits at step {step} (dashed: the causal rule's threshold)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
