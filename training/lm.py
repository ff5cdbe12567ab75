"""`CausalLM`: next-token training of a `modeldefs.Transformer` as a LightningModule."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from modeldefs import ModelConfig, Transformer
from modeldefs.config import check_fields
from modeldefs.pretrained import load_pretrained
from modeldefs.quietstar import QuietStar
from training.errors import ConfigError, ConfigFileNotFoundError
from training.loss import linear_cross_entropy
from training.optim_state import by_name, by_number
from training.parallelize import (ActivationCheckpointing, DType, apply_activation_checkpointing, apply_compile,
                                  apply_fsdp, data_parallel_mesh)
from training.routing import causal_fraction, routing_losses
from training.schedule import warmup_cosine
from training.steps import ends_fit, ends_optimizer_step, is_logging_step
from training.strategy import check_cpu_offload


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite (before the optimizer touches the weights)."""


def load_init_from(source: str) -> Transformer | QuietStar:
    """`load_pretrained(source)` for model.init_args.init_from, a source that is not there or that load_pretrained
    refuses (an unreadable checkpoint, an unsupported architecture) refused as that setting."""
    try:
        return load_pretrained(source)
    except FileNotFoundError as error:
        raise ConfigFileNotFoundError(f"model.init_args.init_from: {error}") from error
    except ValueError as error:
        raise ConfigError(f"model.init_args.init_from: {error}") from error


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter; the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def _store_tied_weight_once(state: dict[str, Any]) -> None:
    """Point each `lm_head.weight` at its tied `embed.weight`, so `torch.save` writes the matrix once.

    FSDP2's full state dict gathers the two names into two tensors (one process's state dict shares
    one); sharded (DTensor) state is left as it is, since distributed checkpoints store by name."""
    for head in [k for k in state if k.endswith("lm_head.weight")]:
        embed = head.removesuffix("lm_head.weight") + "embed.weight"
        if embed in state and not isinstance(state[head], DTensor):
            state[head] = state[embed]


def _is_routing_weight(name: str) -> bool:
    """Whether a decoder state-dict key belongs to a Mixture-of-Depths router or predictor."""
    return ".router." in name or ".predictor." in name


class CausalLM(L.LightningModule):
    """Next-token training of a quietdepth `Transformer` (dense or Mixture-of-Depths), from scratch or from
    pretrained weights, with AdamW, warm-up + cosine schedule and the fused chunked loss. `configure_model`
    applies activation checkpointing, `torch.compile` and, under ModelParallelStrategy, FSDP2 per block
    (`training.parallelize`)."""

    def __init__(
        self,
        model: str | None = "tiny",
        model_overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        lr: float = 3e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        compile: bool = False,
        check_finite_loss: bool = True,
        finite_check_interval: int = 1,
        loss_chunk_size: int | None = 1024,
        activation_checkpointing: ActivationCheckpointing = "none",
        fsdp_param_dtype: DType = "bfloat16",
        fsdp_reduce_dtype: DType = "float32",
        fsdp_cpu_offload: bool = False,
    ) -> None:
        """
        Args:
            model: named architecture (`modeldefs.config.NAMED_CONFIGS`) for random init; None with `init_from`.
            model_overrides: ModelConfig fields to change (e.g. {"n_layer": 2, "block_size": 512}).
            init_from: pretrained source to start from: "smollm2-135m-instruct" (offline GGUF), a .gguf
                file, an HF model directory or hub id, or a quietdepth .ckpt (of a Quiet-STaR model: the
                language model it wraps). None = random init.
            lr: peak learning rate of AdamW.
            min_lr_ratio: the cosine schedule decays to lr * min_lr_ratio at trainer.max_steps.
            warmup_steps: optimizer steps of linear warm-up from ~0 to lr.
            weight_decay: AdamW decay on matrices and embeddings (never on norms and biases).
            betas: AdamW betas.
            eps: AdamW epsilon.
            compile: torch.compile each decoder block, and each chunk's softmax and gradient in the fused loss.
            check_finite_loss: stop with `NonFiniteLossError` on a NaN/inf loss, and refuse to write a checkpoint
                whose weights are not finite, so the last one on disk stays good.
            finite_check_interval: read the non-finite-loss flag on the host every this many steps. Each read is a
                host-device sync that stalls a GPU's queue; between reads the flag accumulates on the device, so a
                NaN is still caught, up to this many steps late (checkpoints stay guarded by the weight check).
            loss_chunk_size: tokens per chunk of the fused output projection + cross-entropy
                (`training.loss.linear_cross_entropy`), which never holds the whole logits tensor; None computes
                the full logits and `F.cross_entropy` instead.
            activation_checkpointing: recompute activations in backward to save memory: "none", "block" (all of
                each block's) or "selective" (keep matmul and attention outputs, recompute norms and elementwise ops).
            fsdp_param_dtype: under `ModelParallelStrategy` (FSDP2), the dtype parameters are all-gathered and
                computed in; fp32 master weights and optimizer state stay sharded.
            fsdp_reduce_dtype: under FSDP2, the dtype gradients are reduce-scattered in.
            fsdp_cpu_offload: under FSDP2, keep parameter shards, gradients and the AdamW step in host memory
                (FSDP2's `CPUOffloadPolicy`): fits larger models in GPU memory, costs host-device copies per block.
        """
        super().__init__()
        if init_from is None and model is None:
            raise ConfigError("set model.init_args.model (a named config) or model.init_args.init_from")
        if init_from is not None and model is not None:
            raise ConfigError(f"model={model!r} (random init; the default is 'tiny') and init_from={init_from!r}: set "
                              "one of them, model.init_args.model: null with init_from (in Python: model=None)")
        if finite_check_interval < 1:
            raise ConfigError(f"model.init_args.finite_check_interval={finite_check_interval} must be >= 1 "
                              "(switch the check off with check_finite_loss: false)")
        if not lr > 0 or not 0 <= min_lr_ratio <= 1 or warmup_steps < 0:
            raise ConfigError(f"model.init_args: lr={lr} must be > 0, min_lr_ratio={min_lr_ratio} in [0, 1] "
                              f"(the cosine ends at lr * min_lr_ratio) and warmup_steps={warmup_steps} >= 0")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ConfigError(f"model.init_args.loss_chunk_size={loss_chunk_size} must be >= 1, or null for the "
                              "unfused loss")
        # A bad name or override fails now, not after the data is tokenised (configure_model builds the model).
        if model is not None:
            ModelConfig.from_name(model, **(model_overrides or {}))
        else:
            check_fields(ModelConfig, model_overrides or {})
        self.save_hyperparameters()
        self.model: Transformer | None = None
        self._nonfinite: torch.Tensor | None = None  # any non-finite loss since the last host check (on device)
        self._step_sums: dict[str, torch.Tensor] = {}  # this optimizer step's train scalars so far (on device)
        self._step_micro_batches = 0
        self._restoring: dict[str, Any] | None = None  # a checkpoint to check once the model is built (will_restore)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.device_mesh is not None and self.hparams.fsdp_cpu_offload:
            check_cpu_offload(self.trainer.strategy)  # before any weights load
        overrides = self.hparams.model_overrides or {}
        if self.hparams.init_from is not None:
            self.model = load_init_from(self.hparams.init_from)
            if isinstance(self.model, QuietStar):  # its thought tokens and mixing head are QuietStarLM's to train
                rank_zero_info(f"init_from {self.hparams.init_from} is a Quiet-STaR model: training the language "
                               "model it thinks with, without its thought tokens and mixing head")
                self.model = self.model.lm
            if overrides:
                self.model = self._with_overrides(self.model, overrides)
        else:
            self.model = Transformer(ModelConfig.from_name(self.hparams.model, **overrides))
        self._check_vocab()
        self._check_seq_len()
        self._check_restoring()
        for block in self.model.routed_blocks.values():
            # With neither the 2*sigmoid scale nor the BCE loss a router gets no gradient (the ablation that keeps its
            # initial routing): frozen, it stays out of AdamW, which under FSDP resumes only parameters with a state.
            if not block.scale_by_router and self.model.config.mod_aux_weight == 0:
                block.router.requires_grad_(False)
        hp = self.hparams
        apply_activation_checkpointing(self.model, hp.activation_checkpointing)
        if hp.compile:
            apply_compile(self.model)
        if self.device_mesh is not None:  # ModelParallelStrategy
            # The LightningModule is the FSDP root, so that `loss` (embedding, trunk, fused head) runs inside
            # the root's all-gather/reduce-scatter hooks like a forward.
            apply_fsdp(self.model.blocks, self, data_parallel_mesh(self.device_mesh), hp.fsdp_param_dtype,
                       hp.fsdp_reduce_dtype, root_methods=("loss",), cpu_offload=hp.fsdp_cpu_offload)

    @staticmethod
    def _with_overrides(pretrained: Transformer, overrides: dict[str, Any]) -> Transformer:
        """The pretrained weights in a model with changed config fields: e.g. Mixture-of-Depths fields
        MoD-ify a dense model, whose routers and predictors then start from their initialisation, or make
        a MoD model's layers dense (their routers and predictors are left out)."""
        try:  # the values are checked here: the pretrained config they override is known only now
            config = ModelConfig.from_dict({**pretrained.config.to_dict(), **overrides})
        except ValueError as error:
            raise ConfigError(f"model.init_args.model_overrides: {error}") from error
        model = Transformer(config)
        refusal = (f"model_overrides {sorted(overrides)} change the shape of the pretrained weights; only "
                   "Mixture-of-Depths and context fields (block_size, rope_theta, ...) can be overridden")
        try:
            result = model.load_state_dict(pretrained.state_dict(), strict=False)
        except RuntimeError as e:  # size mismatches
            raise ConfigError(refusal) from e
        new = [k for k in result.missing_keys if not _is_routing_weight(k)]
        unexpected = [k for k in result.unexpected_keys if not _is_routing_weight(k)]
        if new or unexpected:
            raise ConfigError(f"{refusal} (missing {new}, unexpected {unexpected})")
        dropped = sorted({k.removeprefix("blocks.").split(".")[0] for k in result.unexpected_keys}, key=int)
        if dropped:  # a MoD source made (partly) dense, routed elsewhere, or without its predictors
            rank_zero_info(f"model_overrides {sorted(overrides)}: the pretrained routers/predictors of layers "
                           f"{', '.join(dropped)} are not used (those layers have none in this config)")
        return model

    def _datamodule(self) -> Any:
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def _check_vocab(self, vocab_size: int | None = None) -> None:
        """Refuse a data tokenizer with more tokens than the model has embedding rows (a crash at step 0 else);
        `vocab_size` defaults to the built model's."""
        tokenizer = getattr(self._datamodule(), "tokenizer", None)
        vocab_size = self._architecture()["vocab_size"] if vocab_size is None else vocab_size
        if tokenizer is not None and len(tokenizer) > vocab_size:
            raise ConfigError(f"data.tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}; "
                              "use the model's tokenizer (data.init_args.tokenizer) or raise "
                              "model.init_args.model_overrides.vocab_size")

    def _check_seq_len(self) -> None:
        seq_len = getattr(self._datamodule(), "seq_len", None)
        if seq_len is not None and seq_len > self.model.config.block_size:
            raise ConfigError(
                f"data.seq_len={seq_len} is longer than the model's context (block_size="
                f"{self.model.config.block_size}); lower data.init_args.seq_len or raise "
                "model.init_args.model_overrides.block_size"
            )

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model(input_ids, **kwargs)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-token cross-entropy (positions labelled -100 are ignored)."""
        if self.hparams.loss_chunk_size is None:
            logits = self.model(batch["input_ids"])
            return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        hidden = self.model.hidden(self.model.embed(batch["input_ids"]))
        return linear_cross_entropy(hidden, self.model.lm_head.weight, batch["labels"], self.hparams.loss_chunk_size,
                                    compiled=self.hparams.compile)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.device_mesh is not None and self.trainer.accumulate_grad_batches > 1:
            # FSDP2 (Lightning's no_sync covers only DDP): keep micro-batch gradients unsharded and local,
            # and reduce-scatter once, in the backward of the optimizer step's last micro-batch.
            self.set_requires_gradient_sync(ends_optimizer_step(self.trainer, batch_idx))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lm_loss = self.loss(batch)
        loss, scalars = lm_loss, {"loss": lm_loss}
        if self.model.routed_blocks:  # statistics: training.routing_monitor.RoutingMonitor
            aux_loss = routing_losses(self.model)
            loss = lm_loss + aux_loss
            scalars["aux_loss"] = aux_loss
        if self.hparams.check_finite_loss:
            self._check_finite(loss.detach())
        self.log_step_means(scalars, batch_idx)
        return loss

    def log_step_means(self, scalars: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Log each of `scalars` (0-d tensors, `loss` among them) as `train/<name>`: its mean over the optimizer
        step's micro-batches and the data-parallel ranks (the whole step's loss, as torchtitan and litgpt log
        it), and `loss` on the progress bar.

        Each micro-batch adds to sums on the device. On steps that read values (the first and Lightning's
        logging steps), the step's last micro-batch averages the means over the ranks (one collective) and
        takes the bar's copy to the host: Lightning turns every progress-bar metric into a number after every
        batch, a sync per step for a device tensor. The fit's last step (by `trainer.max_steps` or `max_epochs`), whose
        means the run summary shows, averages them over the ranks too, without a host copy. Other steps log this rank's
        means with neither a sync nor a collective; a logger writes those only on the row Lightning adds where
        a run stops early (max_time).
        """
        for name, value in scalars.items():
            value = value.detach().float()
            self._step_sums[name] = self._step_sums[name] + value if name in self._step_sums else value
        self._step_micro_batches += 1
        if not ends_optimizer_step(self.trainer, batch_idx):
            return
        means = torch.stack(list(self._step_sums.values())) / self._step_micro_batches
        names = [f"train/{name}" for name in self._step_sums]
        self._step_sums, self._step_micro_batches = {}, 0
        step = self.global_step + 1  # the step this batch completes, as Lightning counts logging steps
        read = step == 1 or is_logging_step(self.trainer, step)
        if read or ends_fit(self.trainer, step):
            means = self.trainer.strategy.reduce(means, reduce_op="mean")
        if read:
            self.log("loss", means[names.index("train/loss")].cpu(), prog_bar=True, logger=False)
        self.log_dict(dict(zip(names, means)))

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss)
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        if (self.global_step + 1) % self.hparams.finite_check_interval and not self.trainer.is_last_batch:
            return
        flag, self._nonfinite = self._nonfinite, None
        if bool(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=False)):
            interval = self.hparams.finite_check_interval
            step, first = self.global_step, max(0, self.global_step - interval + 1)
            when = (f"training loss is {loss.item()} at global step {step}: stopping before the weights are touched"
                    if interval == 1 else
                    f"a training loss was not finite at one of global steps {first}-{step} "
                    f"(finite_check_interval={interval}; loss now {loss.item()}): stopping")
            raise NonFiniteLossError(
                f"{when}; checkpoints already written are intact. Lower model.init_args.lr, raise warmup_steps, "
                "or check the data."
            )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        """Log `<stage>/loss`; for a Mixture-of-Depths model also the share of tokens its causal rule routes and
        the loss under training's top-k routing."""
        # In eval mode a Mixture-of-Depths model routes by its causal rule, as it would when deployed.
        self.log(f"{stage}/loss", self.loss(batch), prog_bar=stage == "val", sync_dist=True)
        if self.model.routed_blocks:
            self.log(f"{stage}/causal_fraction", causal_fraction(self.model), sync_dist=True)
            self.model.train()  # top-k routing, for the cost of the causal rule
            self.log(f"{stage}/loss_topk", self.loss(batch), sync_dist=True)
            self.model.eval()

    def _param_groups(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """AdamW's two groups: matrices (weight decay) and vectors (none: norms, biases)."""
        trained = [p for p in self.model.parameters() if p.requires_grad]
        return [p for p in trained if p.dim() >= 2], [p for p in trained if p.dim() < 2]

    def _optimizer_order(self) -> list[str]:
        """Parameter names in the order this run's optimizer state numbers them: the param groups' order, or
        under `ModelParallelStrategy` (whose full checkpoints Lightning numbers so) `named_parameters()`'."""
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            return [name for name, _ in self.named_parameters()]
        name_of = {id(p): name for name, p in self.named_parameters()}
        return [name_of[id(p)] for group in self._param_groups() for p in group]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = self._param_groups()
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay, "name": "decay"},
             {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}],
            lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=self._loss_scaler() is None,
        )
        max_steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not math.isfinite(max_steps):
            raise ConfigError("the warm-up + cosine schedule decays over the run's optimizer steps, and "
                              "trainer.max_steps=-1 with trainer.max_epochs=-1 trains without end: set "
                              "--trainer.max_steps (or --trainer.max_epochs); trainer.max_time can still stop the "
                              "run earlier")
        max_steps = int(max_steps)
        schedule = partial(warmup_cosine, warmup_steps=hp.warmup_steps, max_steps=max_steps, min_lr_ratio=hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"}}

    def on_fit_start(self) -> None:
        """On several ranks, give each its own random stream (`torch.manual_seed(initial seed + rank)`) now that the
        model is built: the ranks built it from the same seed (the same initial weights), but a random draw in
        training (Quiet-STaR's thoughts) that took the same numbers on every rank coupled the global batch's samples
        instead of drawing them independently. A resumed run then restores each rank's own stream (`RNGState`)."""
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.trainer.global_rank)

    def on_train_start(self) -> None:
        """Apply this run's optimizer settings over those a resumed checkpoint restored (its param groups
        and the schedule's base learning rate), so that a resume with, say, a new lr trains with it. A fit
        that stopped inside an optimizer step leaves no partial train/* sums to the next."""
        self._step_sums, self._step_micro_batches = {}, 0
        hp, (optimizer,), (config,) = self.hparams, self.trainer.optimizers, self.trainer.lr_scheduler_configs
        scheduler = config.scheduler
        changed = set()
        for i, group in enumerate(optimizer.param_groups):
            wanted = {"initial_lr": hp.lr, "betas": tuple(hp.betas), "eps": hp.eps,
                      "weight_decay": hp.weight_decay if group.get("name") == "decay" else 0.0}
            changed |= {key for key, value in wanted.items() if group.get(key) != value}
            group.update(wanted)
            scheduler.base_lrs[i] = hp.lr
            group["lr"] = hp.lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if changed and self.trainer.ckpt_path:
            rank_zero_info(f"resumed with this run's {', '.join(sorted(changed))} (the checkpoint's differed)")

    def _loss_scaler(self) -> Any:
        """The fp16 loss scaler of Lightning's precision plugin (None for fp32 and bf16)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's AMP plugin refuses to clip for fused optimizers because they unscale fp16 gradients
        # inside `step`. The optimizer is fused only when there is no loss scaler, so clipping here is exact.
        if self._loss_scaler() is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            if isinstance(grad_norm, DTensor):  # FSDP2: the norm of the local shards' norms
                grad_norm = grad_norm.full_tensor()
            self.log("train/grad_norm", grad_norm)

    def _architecture(self) -> dict[str, Any]:
        """The decoder's `ModelConfig` as a dict, as checkpoints store it."""
        return self.model.config.to_dict()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._refuse_nonfinite_weights()
        # The architecture travels with the weights so a checkpoint loads without its YAML.
        checkpoint["model_config"] = self._architecture()
        if checkpoint["model_config"]["tie_embeddings"]:
            _store_tied_weight_once(checkpoint.get("state_dict", {}))
        if "optimizer_states" in checkpoint:  # keyed by name, the optimizer state resumes under any strategy
            order = self._optimizer_order()
            checkpoint["optimizer_states"] = [by_name(s, order) for s in checkpoint["optimizer_states"]]

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, naming the fields, a checkpoint (its Lightning dict, or a sharded one's metadata) of another kind
        of model or another architecture than the one built."""
        thinks, thought = "thought_config" in checkpoint, hasattr(self.model, "thought_config")
        if thinks != thought:
            kinds = (("a Quiet-STaR", "a plain language model") if thinks
                     else ("a plain language-model", "a Quiet-STaR model"))
            raise ConfigError(f"--ckpt_path holds {kinds[0]} checkpoint and this run trains {kinds[1]} "
                              f"({type(self).__name__}): give the config it was trained with, or start a new run from "
                              "its weights with model.init_args.init_from=<checkpoint>")
        saved, ours = checkpoint.get("model_config") or {}, self._architecture()
        changed = {k: (saved[k], v) for k, v in ours.items() if k in saved and saved[k] != v}
        if changed:
            fields = ", ".join(f"{k}: {old} in the checkpoint, {new} here" for k, (old, new) in sorted(changed.items()))
            raise ConfigError(f"--ckpt_path resumes the same architecture, and this one differs ({fields}). Give the "
                              "checkpoint's settings, or start a new run from its weights with "
                              "model.init_args.init_from=<checkpoint> (plus model_overrides to MoD-ify it)")

    def will_restore(self, checkpoint: dict[str, Any]) -> None:
        """Run `check_checkpoint` on `checkpoint` (`training.callbacks.checkpoint_metadata` of --ckpt_path) as soon as
        `configure_model` has built the model. Under `ModelParallelStrategy` Lightning loads the weights before
        `on_load_checkpoint`: a checkpoint of another architecture ended in DCP's "Missing key in checkpoint
        state_dict" (or load_state_dict's) traceback, or with fewer layers loaded in part, before it was refused."""
        self._restoring = checkpoint

    def _check_restoring(self) -> None:
        """`check_checkpoint` on what `will_restore` announced (once the model is built), then let it go."""
        checkpoint, self._restoring = self._restoring, None
        if checkpoint is not None:
            self.check_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse (`check_checkpoint`) a checkpoint of another architecture before its weights are loaded (under
        `ModelParallelStrategy` the CLI has it checked in `configure_model`: `will_restore`). In validate and test, log
        on the checkpoint's step, as the fit logged its validation of these weights."""
        self.check_checkpoint(checkpoint)
        if "optimizer_states" in checkpoint and not isinstance(self.trainer.strategy, ModelParallelStrategy):
            order = self._optimizer_order()  # (ModelParallelStrategy reads state keyed by name itself)
            checkpoint["optimizer_states"] = [by_number(s, order) for s in checkpoint["optimizer_states"]]
        if self.trainer.state.fn != TrainerFn.FITTING:  # Lightning restores the fit loop only to fit: step 0 else
            epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = epoch_loop.get("_batches_that_stepped", 0)

    def _refuse_nonfinite_weights(self) -> None:
        """Raise before a checkpoint with NaN/inf weights is written (every rank's shards are checked)."""
        if not self.hparams.check_finite_loss:
            return
        local_ok = all(bool(_local(p).isfinite().all()) for p in self.model.parameters())
        if not self.trainer.strategy.reduce_boolean_decision(local_ok, all=True):
            raise NonFiniteLossError(
                f"weights are not finite at global step {self.global_step}: stopping without writing this "
                "checkpoint; the checkpoints already written are intact. Lower model.init_args.lr or check the data."
            )
