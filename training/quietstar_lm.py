"""`QuietStarLM`: Quiet-STaR training (Zelikman et al., 2024) of a `modeldefs.Transformer` as a LightningModule."""

from __future__ import annotations

from typing import Any, Literal

import torch

from modeldefs import ModelConfig, Transformer
from modeldefs.pretrained import is_checkpoint, load_tokenizer
from modeldefs.quietstar import QuietStar, ThoughtConfig, ThoughtOutput
from training.errors import ConfigError
from training.lm import CausalLM, load_init_from
from training.parallelize import DType, apply_compile, apply_fsdp, checkpointed, data_parallel_mesh
from training.routing import causal_fraction
from training.strategy import check_cpu_offload


class QuietStarLM(CausalLM):
    """Trains a model to think: the Quiet-STaR objective of `modeldefs.quietstar.QuietStar` on the data's token ids.

    Everything else is `CausalLM`'s: AdamW with warm-up + cosine, clipping, the non-finite loss guard,
    `init_from` a pretrained source, Mixture-of-Depths overrides. The wrapped model is `self.model`
    (a `QuietStar`), so checkpoints carry `model.lm.*`, the meta tokens and the mixing head, plus
    `model_config` and `thought_config`; `modeldefs.pretrained.load_pretrained(ckpt)` returns the `QuietStar`.

    Under `ModelParallelStrategy` the whole `QuietStar` is one FSDP2 unit: every block runs
    n_ahead + n_ahead_talk - 1 times per step (pass 0 and each thought/talk pass), so sharding per block
    would all-gather and reduce-scatter each block that many times. As one unit, the parameters are
    all-gathered once per step and the gradients reduce-scattered once; between steps parameters,
    gradients and AdamW state stay sharded.
    """

    def __init__(
        self,
        model: str | None = "tiny",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        thoughts: dict[str, Any] | None = None,
        thought_init_text: str = "---",
        thought_init_tokenizer: str | None = None,
        activation_checkpointing: Literal["none", "mlp"] = "none",
        val_seed: int = 0,
        lr: float = 1e-6,
        min_lr_ratio: float = 1.0,
        warmup_steps: int = 20,
        weight_decay: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        compile: bool = False,
        check_finite_loss: bool = True,
        finite_check_interval: int = 1,
        fsdp_param_dtype: DType = "bfloat16",
        fsdp_reduce_dtype: DType = "float32",
        fsdp_cpu_offload: bool = False,
    ) -> None:
        """
        Args:
            model: named architecture for random init; None with `init_from`.
            model_overrides: ModelConfig fields to change (e.g. Mixture-of-Depths fields to MoD-ify a pretrained model).
            init_from: pretrained source: "smollm2-135m-instruct" (offline GGUF), a .gguf, an HF directory or hub id,
                or a quietdepth .ckpt (a Quiet-STaR checkpoint keeps its meta tokens and mixing head).
            thoughts: `modeldefs.quietstar.ThoughtConfig` fields (n_ahead, n_ahead_talk, n_passes, stride, ...);
                unset fields keep the official defaults, or with a Quiet-STaR `init_from` its settings (so that its
                mixing head and meta tokens compute what they were trained to; a new meta_token_scale keeps the
                learned <start>/<end> vectors and changes only their learning rate).
            thought_init_text: the start/end-of-thought embeddings start from the embedding of this text's first
                token ("---", as the official code; the paper describes an em dash).
            thought_init_tokenizer: tokenizer source that encodes `thought_init_text`; None uses the datamodule's
                (which must match the model's vocabulary anyway), else the `init_from` source's.
            activation_checkpointing: "mlp": recompute each block's MLP in the backward pass instead of keeping
                its activations (`recompute_mlps`): the thought passes multiply activation memory by about
                n_ahead + n_ahead_talk - 1 (at stride 1). Whole blocks cannot be recomputed: their attention
                appends to the thoughts' KV cache.
            val_seed: seed of the thought sampling in validation, so every validation sees the same draws.
            lr: peak AdamW learning rate (official run: 1e-6).
            min_lr_ratio: the cosine decays to lr * min_lr_ratio (1.0: constant after warm-up, as the official run).
            warmup_steps: optimizer steps of linear warm-up (official: 20).
            weight_decay: AdamW decay on matrices and embeddings (official: 0.001).
            betas: AdamW betas (official: torch defaults).
            eps: AdamW epsilon.
            compile: torch.compile each decoder block.
            check_finite_loss: stop on a NaN/inf loss before the optimizer step; never write non-finite weights.
            finite_check_interval: read the non-finite-loss flag on the host every this many steps (see `CausalLM`).
            fsdp_param_dtype, fsdp_reduce_dtype, fsdp_cpu_offload: under FSDP2, as in `CausalLM`.
        """
        super().__init__(model=model, model_overrides=model_overrides, init_from=init_from, lr=lr,
                         min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps, weight_decay=weight_decay, betas=betas,
                         eps=eps, compile=compile, check_finite_loss=check_finite_loss,
                         finite_check_interval=finite_check_interval, fsdp_param_dtype=fsdp_param_dtype,
                         fsdp_reduce_dtype=fsdp_reduce_dtype, fsdp_cpu_offload=fsdp_cpu_offload)
        self.thought_config = ThoughtConfig.from_dict(thoughts or {})  # fails here, naming unknown keys
        self.model: QuietStar | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.device_mesh is not None and self.hparams.fsdp_cpu_offload:
            check_cpu_offload(self.trainer.strategy)  # before any weights load
        hp = self.hparams
        overrides = hp.model_overrides or {}
        previous: QuietStar | None = None
        source: Transformer | None = None  # the pretrained decoder, before any override
        if hp.init_from is not None:
            loaded = load_init_from(hp.init_from)
            previous = loaded if isinstance(loaded, QuietStar) else None
            lm = source = previous.lm if previous is not None else loaded
            if previous is not None:  # thought settings not given keep the checkpoint's (e.g. its mixing_bound)
                saved = previous.thought_config.to_dict()
                self.thought_config = ThoughtConfig.from_dict({**saved, **(hp.thoughts or {})})
            if overrides:
                lm = self._with_overrides(lm, overrides)
        else:
            lm = Transformer(ModelConfig.from_name(hp.model, **overrides))
        _refuse_untrained_predictors(lm, source)
        _refuse_untrained_routers(lm, source)
        self._check_vocab(lm.config.vocab_size)  # before the meta tokens take a row of the data tokenizer's
        self.model = QuietStar(lm, self.thought_config, init_token_id=self._init_token_id())
        for block in lm.routed_blocks.values():  # Quiet-STaR routes by the causal rule, never by top-k, so the
            if block.predictor is not None:      # MoD predictors get no gradient: frozen, they stay out of AdamW
                block.predictor.requires_grad_(False)  # (under FSDP every parameter it holds needs a state)
            if not block.scale_by_router:  # nor do routers whose logit does not scale the update
                block.router.requires_grad_(False)
        if previous is not None:  # continue from a Quiet-STaR checkpoint: keep its meta tokens and mixing head
            thought_state = {k: v for k, v in previous.state_dict().items() if not k.startswith("lm.")}
            # <start>/<end> are stored divided by meta_token_scale: a new scale keeps the learned vectors (it
            # changes only how fast they move), so their stored values are rescaled.
            ratio = previous.thought_config.meta_token_scale / self.thought_config.meta_token_scale
            for name in ("start_thought", "end_thought"):
                thought_state[name] = thought_state[name] * ratio
            self.model.load_state_dict(thought_state, strict=False)
        self._check_seq_len()
        self._check_restoring()
        if hp.activation_checkpointing == "mlp":
            recompute_mlps(lm)
        if hp.compile:
            apply_compile(lm)
        if self.device_mesh is not None:  # ModelParallelStrategy: the LightningModule is the one FSDP unit
            apply_fsdp([], self, data_parallel_mesh(self.device_mesh), hp.fsdp_param_dtype, hp.fsdp_reduce_dtype,
                       cpu_offload=hp.fsdp_cpu_offload)

    def _init_token_id(self) -> int:
        datamodule = self._datamodule()
        source = self.hparams.thought_init_tokenizer
        if source is not None:
            tokenizer = load_tokenizer(source)
        elif getattr(datamodule, "tokenizer", None) is not None:
            tokenizer = datamodule.tokenizer
        elif self.hparams.init_from is not None and not is_checkpoint(self.hparams.init_from):
            tokenizer = load_tokenizer(self.hparams.init_from)
        else:
            raise ConfigError("no tokenizer to encode thought_init_text: set model.init_args.thought_init_tokenizer "
                              "(e.g. smollm2-135m-instruct)")
        ids = tokenizer.encode(self.hparams.thought_init_text, add_special_tokens=False)
        if not ids:
            raise ConfigError(f"thought_init_text={self.hparams.thought_init_text!r} encodes to no tokens")
        return ids[0]

    def _check_seq_len(self) -> None:
        seq_len = getattr(self._datamodule(), "seq_len", None)
        block_size = self.model.lm.config.block_size
        # The last thought chain's tokens take rotary positions up to n_ahead + n_ahead_talk - 2 past the sequence.
        c = self.thought_config
        if seq_len is not None and seq_len <= c.n_ahead_talk:
            raise ConfigError(
                f"data.seq_len={seq_len} leaves no position to think at: a thought needs n_ahead_talk="
                f"{c.n_ahead_talk} true tokens after it; raise data.init_args.seq_len or lower "
                "model.init_args.thoughts.n_ahead_talk"
            )
        needed = None if seq_len is None else seq_len + c.n_ahead + c.n_ahead_talk - 2
        if needed is not None and needed > block_size:
            raise ConfigError(
                f"data.seq_len={seq_len} plus the thought and talk tokens ({needed - seq_len}) exceed the model's "
                f"context (block_size={block_size}); lower data.init_args.seq_len or raise "
                "model.init_args.model_overrides.block_size"
            )

    def forward(self, input_ids: torch.Tensor, generator: torch.Generator | None = None,
                think: bool = True) -> ThoughtOutput | torch.Tensor:
        """The Quiet-STaR forward (loss and all its terms), or with think=False the plain decoder's hidden
        states. Steps call this, not `self.model`, so FSDP2's hooks on this module gather the parameters."""
        if not think:
            return self.model.lm.hidden(self.model.lm.embed(input_ids))
        return self.model(input_ids, generator=generator)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        # A Mixture-of-Depths model routes by its causal rule in every pass here (see modeldefs.quietstar): there
        # are no top-k targets, so no routing auxiliary losses; routers learn through their update scale.
        out = self(batch["input_ids"])
        loss = out.loss
        if self.hparams.check_finite_loss:
            self._check_finite(loss.detach())
        self.log_step_means({"loss": loss, **thought_stats(out)}, batch_idx)
        # For training.thought_monitor.ThoughtMonitor; the logits are left out so they are freed after backward.
        return {"loss": loss, "thought_tokens": out.thought_tokens, "positions": out.positions, "reward": out.reward,
                "mixing_weight": out.mixing_weight}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        generator = torch.Generator(batch["input_ids"].device).manual_seed(self.hparams.val_seed + batch_idx)
        out = self(batch["input_ids"], generator=generator)
        self.log("val/loss", out.loss, sync_dist=True)
        self.log("val/lm_nll", out.lm_nll, sync_dist=True)
        self.log("val/base_nll", out.base_nll, sync_dist=True, prog_bar=True)
        self.log("val/mixed_nll", out.mixed_nll, sync_dist=True, prog_bar=True)
        if self.model.lm.routed_blocks:  # routing is kept for the last pass only (talk tokens): one plain pass
            self(batch["input_ids"], think=False)
            self.log("val/causal_fraction", causal_fraction(self.model.lm), sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        generator = torch.Generator(batch["input_ids"].device).manual_seed(self.hparams.val_seed + batch_idx)
        out = self(batch["input_ids"], generator=generator)
        self.log("test/base_nll", out.base_nll, sync_dist=True)
        self.log("test/mixed_nll", out.mixed_nll, sync_dist=True)

    def _architecture(self) -> dict[str, Any]:
        return self.model.lm.config.to_dict()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["thought_config"] = self.model.thought_config.to_dict()

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also refuse (resume, validate, test) thought settings that change what the checkpoint's <start>/<end>
        vectors and mixing head compute: its weights would silently be another model. n_ahead and the
        others may change."""
        saved, ours = checkpoint.get("thought_config") or {}, self.model.thought_config.to_dict()
        keys = ["meta_token_scale", "mixing_bound"]
        if ours["mixing_bound"] == "sigmoid":
            keys.append("mixing_logit_offset")
        changed = [f"{k}: {saved[k]} in the checkpoint, {ours[k]} here"
                   for k in keys if k in saved and saved[k] != ours[k]]
        if changed:
            raise ConfigError(f"--ckpt_path holds thought weights trained with other settings ({', '.join(changed)}): "
                              "give the checkpoint's model.init_args.thoughts, or start a new run from its weights "
                              "with model.init_args.init_from=<checkpoint> (a new meta_token_scale then keeps its "
                              "vectors)")
        super().check_checkpoint(checkpoint)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per input token: the plain decoder's, times the tokens Quiet-STaR runs through it.

        A sequence of T tokens runs through the decoder once (pass 0), then each of its `n_passes` thought
        samples runs (n_ahead + n_ahead_talk - 2) passes of P tokens, P = the thought positions (every
        `stride`-th with n_ahead_talk tokens after it). The mixing head is not counted, and thought tokens
        are charged the attention of a T-token sequence. Mixture-of-Depths layers count in full: every pass
        routes by the causal rule, which computes each token and masks the updates of those it skips.
        """
        c = self.model.thought_config
        positions = -(-(seq_len - c.n_ahead_talk) // c.stride)
        tokens = seq_len + c.n_passes * (c.n_ahead + c.n_ahead_talk - 2) * positions
        return int(self.model.lm.flops_per_token(seq_len, top_k=False) * tokens / seq_len)


def _refuse_untrained_predictors(lm: Transformer, source: Transformer | None) -> None:
    """Refuse routing by predictors that this run creates: Quiet-STaR gives them no targets and freezes
    them, so they would decide every pass's routing at their random initialisation throughout."""
    if lm.config.mod_causal_rule != "predictor":
        return
    trained = {i for i, block in source.routed_blocks.items() if block.predictor is not None} if source else set()
    new = sorted(i for i, block in lm.routed_blocks.items() if block.predictor is not None and i not in trained)
    if new:
        raise ConfigError(
            f"mod_causal_rule=predictor routes every Quiet-STaR pass by the predictors of layers {new}, which this "
            "run creates and Quiet-STaR never trains (they would route at random): start from a Mixture-of-Depths "
            "checkpoint whose predictors were trained (model.init_args.init_from=<a run of "
            "configs/mod-smollm2-135m.yaml>), or set model_overrides.mod_causal_rule: router")


def _refuse_untrained_routers(lm: Transformer, source: Transformer | None) -> None:
    """Refuse routing by routers that this run creates and cannot train: with mod_scale_by_router false the
    router's logit never reaches the Quiet-STaR loss (it has no top-k targets either), so new routers would
    decide every pass's routing at their random initialisation throughout (a pretrained MoD model's routers
    are kept, frozen)."""
    if lm.config.mod_scale_by_router or lm.config.mod_causal_rule != "router":
        return
    trained = set(source.routed_blocks) if source is not None else set()
    new = sorted(i for i in lm.routed_blocks if i not in trained)
    if new:
        raise ConfigError(
            f"mod_scale_by_router=false: Quiet-STaR trains a router only through the 2*sigmoid(logit) scale on its "
            f"layer's update, so the routers of layers {new}, which this run creates, would route at random: set "
            "model_overrides.mod_scale_by_router: true, or start from a Mixture-of-Depths checkpoint whose routers "
            "were trained (model.init_args.init_from=<a run of configs/mod-smollm2-135m.yaml>)")


def recompute_mlps(lm: Transformer) -> None:
    """Activation checkpointing of every block's MLP: it keeps only its input and recomputes the rest
    (for SmolLM2 3x the width of the residual stream) in backward. Attention is not recomputed: in
    Quiet-STaR's thought passes it appends to a KV cache, a side effect that must happen once."""
    for block in lm.blocks:
        # An instance attribute shadows the class's forward, so state-dict keys stay as they are.
        block.mlp.forward = checkpointed(block.mlp)


def thought_stats(out: ThoughtOutput) -> dict[str, torch.Tensor]:
    """Scalars to log from one Quiet-STaR micro-batch: NLL of the talk tokens without (base) and with (mixed) thought
    and their difference, the plain LM's NLL over all positions, mixing weight, reward, policy loss. Logged as
    means over the optimizer step (`CausalLM.log_step_means`): the std's are the micro-batches' std's, averaged."""
    w = out.mixing_weight.detach().float()
    r = out.reward.detach().float()
    return {
        "lm_nll": out.lm_nll.detach(),
        "base_nll": out.base_nll.detach(),
        "mixed_nll": out.mixed_nll.detach(),
        "nll_gain": (out.base_nll - out.mixed_nll).detach(),
        "policy_loss": out.policy_loss.detach(),
        "mixing_weight_mean": w.mean(),
        "mixing_weight_std": w.std() if w.numel() > 1 else w.new_zeros(()),
        "reward_mean": r.mean(),
        "reward_std": r.std() if r.numel() > 1 else r.new_zeros(()),
        "reward_positive_fraction": (r > 0).float().mean(),
    }
