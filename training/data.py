"""`TextDataModule`: documents from a hub dataset or local files, tokenised once, packed into windows.

Each record becomes one document (a text field, or a GSM8K/CSQA formatting), the tokenizer's EOS
is appended to every document, and the token stream is cut into windows of ``seq_len + 1`` tokens
(inputs and next-token labels). The tokenised documents are cached on disk, keyed by their text and
the tokenizer, so a second run (or every rank after the first) skips tokenisation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from modeldefs.pretrained import load_tokenizer
from training.errors import ConfigError, ConfigFileNotFoundError
from training.formatting import BadRecord, Format, formatter
from training.sampler import ResumableSampler

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


class PackedDataset(Dataset):
    """Consecutive windows of ``seq_len + 1`` tokens from one stream; neighbours share one token."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].long()
        return {"input_ids": window[:-1], "labels": window[1:]}


def _is_local(path: str) -> bool:
    return os.path.exists(path) or Path(path).suffix in _LOCAL_BUILDERS or path.startswith((".", "/", "~"))


def jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    """(file:line, record or the JSON or UTF-8 error) for every non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: a BOM, as Windows tools write
            except UnicodeDecodeError as e:
                byte = f"byte {raw[e.start]:#04x} at column {e.start + 1}"
                yield f"{path}:{lineno}", BadRecord(f"not UTF-8 text ({byte})")
                continue
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", BadRecord(f"malformed JSON ({e.msg}, column {e.colno})")


def _records(path: str, name: str | None, split: str) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs from a local file or a hub dataset."""
    if _is_local(path):
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise ConfigFileNotFoundError(
                f"data.path: {path} not found; set data.init_args.path to a jsonl/json/txt/parquet/csv file, "
                "a directory of them, or a hub dataset id such as openai/gsm8k"
            )
        if path.endswith(".jsonl"):
            yield from jsonl_records(path)
            return
        builder = _LOCAL_BUILDERS.get(Path(path).suffix)
        if builder is None and not os.path.isdir(path):
            raise ConfigError(f"data.path: {path} is a file of no kind the data module reads "
                              f"({Path(path).suffix or 'no suffix'}); set data.init_args.path to a jsonl/json/txt/"
                              "parquet/csv file (named so) or a directory of them")
        if builder is None:  # a directory: let `datasets` infer the format of the files in it
            dataset = datasets.load_dataset(path, name=name, split=split)
        else:
            extra = {"sample_by": "document"} if builder == "text" else {}
            dataset = datasets.load_dataset(builder, data_files=path, split="train", **extra)
    else:
        try:
            dataset = datasets.load_dataset(path, name=name, split=split)
        except ConnectionError as error:
            raise ConnectionError(f"data.path={path!r} is a hub dataset and the hub is out of reach ({error}); "
                                  "offline, set data.init_args.path to a local jsonl/json/txt/parquet/csv file"
                                  ) from error
    for i, record in enumerate(dataset):
        yield f"{path} ({split}) row {i}", record


class TextDataModule(L.LightningDataModule):
    """Tokenised documents (hub dataset or local files) packed into fixed-length sequences, sharded by
    rank, with a resumable position (`state_dict`)."""

    def __init__(
        self,
        path: str,
        tokenizer: str = "smollm2-135m-instruct",
        name: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        format: Format = "text",
        text_field: str = "text",
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 1234,
        on_bad_row: Literal["error", "skip"] = "error",
        max_documents: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            path: hub dataset id (``openai/gsm8k``) or a local jsonl/json/txt/parquet/csv file or directory.
            tokenizer: tokenizer source: ``smollm2-135m-instruct`` (offline), a .gguf, an HF directory or hub id.
            name: hub dataset configuration (``main`` for openai/gsm8k).
            split: hub split to train on (a local file is a single split).
            val_split: hub (or directory) split to validate on; None holds out ``val_fraction`` of the
                documents instead. Refused for a single local file.
            val_fraction: share of documents held out for validation when ``val_split`` is None (0: none);
                of a single document (a plain .txt file), the share of its tokens at its end.
            format: ``text`` (the ``text_field`` as it is), ``gsm8k`` (question + worked answer) or
                ``csqa`` (question, lettered choices, answer letter).
            text_field: the record field holding the text for ``format: text``.
            seq_len: tokens per training sequence.
            batch_size: sequences per batch on each device.
            num_workers: DataLoader worker processes.
            seed: seed of the document hold-out and of the per-epoch shuffle.
            on_bad_row: ``error`` stops at the first malformed record (naming file:line), ``skip`` drops it.
            max_documents: use only the first N documents (quick runs); None uses all.
            cache_dir: where tokenised documents are cached (default: the `datasets` cache).
        """
        super().__init__()
        for field, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_documents", max_documents)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{field}={value} must be >= 1" + (" (null uses every document)"
                                                                           if field == "max_documents" else ""))
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        if val_split is not None and _is_local(path) and not os.path.isdir(os.path.expanduser(path)):
            raise ConfigError(f"data.val_split={val_split!r} names a split of a hub dataset or a directory, but {path} "
                              "is a single file with one split (validating on it would validate on the training "
                              "data): drop val_split and hold out data.init_args.val_fraction instead")
        if val_split is not None and val_split == split:
            raise ConfigError(f"data.val_split={val_split!r} is data.split (validating on it would validate on the "
                              "training data): name another split, or drop val_split and hold out "
                              "data.init_args.val_fraction of the documents")
        if os.path.exists(os.path.expanduser(tokenizer)):  # stored absolute, so a checkpoint names it from anywhere
            tokenizer = os.path.abspath(os.path.expanduser(tokenizer))
        self.save_hyperparameters()
        self.seq_len = seq_len
        self._tokenizer: Any | None = None
        self._splits: dict[str, PackedDataset] | None = None
        self._train_sampler: ResumableSampler | None = None
        self._resume: tuple[int, int, int] | None = None  # (epoch, consumed, counted) from a checkpoint
        self._resumed_order: tuple[int | None, int | None] = (None, None)  # the checkpoint's (sequences, seed)

    @property
    def tokenizer(self) -> Any:
        """The HF tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = load_tokenizer(self.hparams.tokenizer)
            except (OSError, ValueError) as error:
                raise ConfigError(f"data.tokenizer={self.hparams.tokenizer!r} cannot be loaded ({error}); set "
                                  "data.init_args.tokenizer to smollm2-135m-instruct, a .gguf file, an HF tokenizer "
                                  "folder or a hub id") from error
            if self._tokenizer.eos_token_id is None:
                raise ConfigError(f"data.tokenizer={self.hparams.tokenizer!r} has no EOS token to end documents with")
        return self._tokenizer

    # -- documents and tokens ------------------------------------------------------------------

    def documents(self, split: str) -> list[str]:
        """The formatted documents of `split` (malformed records stop or are skipped per ``on_bad_row``; blank
        ones, such as wikitext's empty lines, are left out: they would only teach EOS after EOS)."""
        hp = self.hparams
        fmt = formatter(hp.format, hp.text_field)
        docs, skipped = [], []
        for where, record in _records(hp.path, hp.name, split):
            try:
                if isinstance(record, BadRecord):
                    raise record
                doc = fmt(record)
                if doc.strip():
                    docs.append(doc)
            except BadRecord as e:
                if hp.on_bad_row == "error":
                    fix = ("set data.init_args.text_field (format text) or data.init_args.format to match the "
                           "file's fields, or fix the row" if not docs and not skipped else  # the very first row
                           "fix the row or set data.init_args.on_bad_row=skip")
                    raise ConfigError(f"{where}: {e}; {fix}") from None
                skipped.append(where)
            if hp.max_documents is not None and len(docs) >= hp.max_documents:
                break
        if skipped:
            rank_zero_warn(f"data: skipped {len(skipped)} malformed rows (first: {skipped[0]})")
        if not docs:
            raise ConfigError(f"data.path: {hp.path} ({split}) has no documents; check the file and data.format")
        return docs

    def _cache_path(self, docs: list[str]) -> Path:
        key = hashlib.sha256()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        key.update((backend.to_str() if backend is not None else self.tokenizer.name_or_path).encode())
        key.update(str(self.tokenizer.eos_token_id).encode())
        for doc in docs:
            key.update(doc.encode())
            key.update(b"\0")
        root = Path(self.hparams.cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "quietdepth-tokens")
        return root / f"tokens-{key.hexdigest()[:24]}.arrow"

    def tokenized(self, split: str) -> datasets.Dataset:
        """One row of token ids (EOS appended) per document, from the cache when it holds them."""
        docs = self.documents(split)
        path = self._cache_path(docs)
        if path.is_file():
            return datasets.Dataset.from_file(str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        eos = self.tokenizer.eos_token_id

        def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            ids = self.tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [doc + [eos] for doc in ids]}

        features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
        return datasets.Dataset.from_dict({"text": docs}).map(
            tokenize, batched=True, remove_columns=["text"], features=features,
            cache_file_name=str(path), desc="tokenizing",
        )

    @staticmethod
    def _stream(dataset: datasets.Dataset, order: np.ndarray | None = None) -> torch.Tensor:
        """The documents' tokens back to back (in `order` when given)."""
        column = dataset.data.column("input_ids").combine_chunks()
        flat = column.flatten().to_numpy()
        if order is None:
            return torch.from_numpy(flat.astype(np.int32))
        offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(column).to_numpy())])
        return torch.from_numpy(np.concatenate([flat[offsets[i] : offsets[i + 1]] for i in order]).astype(np.int32))

    def _build(self) -> dict[str, PackedDataset]:
        hp = self.hparams
        train = self.tokenized(hp.split)
        if hp.val_split is not None:
            streams = {"train": self._stream(train), "val": self._stream(self.tokenized(hp.val_split))}
        elif hp.val_fraction > 0 and len(train) == 1:  # one document (a whole .txt file): hold out its end
            tokens = self._stream(train)
            cut = len(tokens) - max(1, round(len(tokens) * hp.val_fraction))
            streams = {"train": tokens[:cut], "val": tokens[cut:]}
        elif hp.val_fraction > 0:
            order = np.random.default_rng(hp.seed).permutation(len(train))
            n_val = max(1, round(len(train) * hp.val_fraction))
            streams = {"train": self._stream(train, np.sort(order[n_val:])),
                       "val": self._stream(train, np.sort(order[:n_val]))}
        else:
            streams = {"train": self._stream(train)}
        splits = {name: PackedDataset(tokens, self.seq_len) for name, tokens in streams.items()}
        for name, data in splits.items():
            if len(data) == 0:
                fix = "raise data.init_args.val_fraction" if name == "val" else "use more documents"
                raise ConfigError(
                    f"data: the {name} split has {len(data.tokens)} tokens, fewer than one sequence of "
                    f"data.seq_len+1={self.seq_len + 1}; lower data.init_args.seq_len or {fix}"
                )
        rank_zero_info(
            "data: " + ", ".join(f"{name} {len(d.tokens):,} tokens -> {len(d):,} sequences of {self.seq_len}"
                                 for name, d in splits.items())
        )
        return splits

    # -- Lightning hooks -----------------------------------------------------------------------

    def prepare_data(self) -> None:
        # Runs on one process per node before `setup`: it fills the token cache the other ranks read.
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            self._splits = self._build()

    def _rank(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _loader(self, data: PackedDataset, sampler: ResumableSampler, drop_last: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        self.setup()
        data = self._splits["train"]
        rank, world = self._rank()
        if len(data) // world < self.hparams.batch_size:
            raise ConfigError(
                f"data: {len(data)} training sequences make no full batch of data.batch_size={self.hparams.batch_size}"
                f" on each of {world} device(s); lower data.init_args.batch_size or seq_len, or use more data"
            )
        self._train_sampler = ResumableSampler(len(data), True, self.hparams.seed, rank, world)
        if self._resume is not None:
            self._warn_if_the_order_changed(len(data))
            self._train_sampler.resume_from(*self._resume)
            self._resume = None
        return self._loader(data, self._train_sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if "val" not in self._splits:
            return []
        rank, world = self._rank()
        data = self._splits["val"]
        if len(data) % world:
            rank_zero_warn(f"data: validation scores {len(data) // world * world} of its {len(data)} sequences on "
                           f"{world} processes (each rank gets as many, so ranks step together): val/loss differs a "
                           "little from a run on another number of processes")
        return self._loader(data, ResumableSampler(len(data), False, 0, rank, world), False)

    def test_dataloader(self) -> DataLoader | list:
        """The held-out split (the same data as validation)."""
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """The position in the training data, saved in checkpoints written while fitting."""
        if self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return {}
        epochs = self.trainer.fit_loop.epoch_progress.current
        if epochs.processed == epochs.started:  # between epochs (a save at the epoch's or fit's end): the next starts
            epoch, processed = epochs.started, 0  # whole; its number, as the sampler's, is the epochs started so far
        else:  # `processed` counts batches whose step has run; checkpoints are written after that increment
            epoch, processed = epochs.processed, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        consumed = processed * self.hparams.batch_size * self.trainer.world_size  # all ranks together
        return {"epoch": epoch, "sequences_consumed": consumed, "batches_counted": processed,
                "sequences": len(self._splits["train"]), "seed": self.hparams.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            # Lightning resumes its per-rank batch counter at `batches_counted`, whatever the new batch size
            # and number of ranks: the sampler's length accounts for it (absent from older checkpoints).
            counted = state_dict.get("batches_counted", 0) * self.hparams.batch_size
            self._resume = (state_dict["epoch"], state_dict["sequences_consumed"], counted)
            self._resumed_order = (state_dict.get("sequences"), state_dict.get("seed"))  # absent from older ones

    def _warn_if_the_order_changed(self, sequences: int) -> None:
        """The resumed position counts sequences of the checkpoint's shuffled order; in another order (other data,
        seq_len or seed) skipping as many does not leave the unseen part of the epoch."""
        then, now = self._resumed_order, (sequences, self.hparams.seed)
        if None not in then and then != now:
            epoch, consumed, _ = self._resume
            rank_zero_warn(f"data: the checkpoint stopped {consumed:,} sequences into epoch {epoch} of {then[0]:,} "
                           f"sequences shuffled with data.seed={then[1]}; this run has {now[0]:,} shuffled with "
                           f"data.seed={now[1]}, so the rest of epoch {epoch} skips the first {consumed:,} of another "
                           "order: it repeats some sequences already trained on and leaves out others")
