"""TextDataModule: formatting, packing, hold-out, shuffling, caching, sources and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch.utils.data import DataLoader

from training import data as data_module
from training.data import TextDataModule
from training.formatting import format_csqa, format_gsm8k
from training.sampler import ResumableSampler

DOCS = [f"Document number {i} says {'la ' * (i % 7)}and ends here." for i in range(40)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])


@pytest.fixture
def make(smollm2_tokenizer_dir, tmp_path):
    def make(path: Path | str, **kwargs) -> TextDataModule:
        kwargs = {"tokenizer": str(smollm2_tokenizer_dir), "cache_dir": str(tmp_path / "cache"), "seq_len": 8,
                  "batch_size": 2, "val_fraction": 0.0, **kwargs}
        return TextDataModule(str(path), **kwargs)
    return make


def token_stream(dm: TextDataModule, docs: list[str]) -> list[int]:
    out = []
    for doc in docs:
        out += dm.tokenizer(doc, add_special_tokens=False).input_ids + [dm.tokenizer.eos_token_id]
    return out


# -- formatting ----------------------------------------------------------------------------------

def test_gsm8k_record_becomes_question_and_worked_answer():
    record = {"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}
    assert format_gsm8k(record) == "Question: What is 2+3?\nAnswer: 2+3=<<2+3=5>>5\n#### 5"


def test_csqa_official_and_hub_schemas_give_the_same_document():
    choices = [("A", "ignore"), ("B", "enforce"), ("C", "yell at")]
    official = {"answerKey": "B", "question": {"stem": "Pick one?",
                                               "choices": [{"label": l, "text": t} for l, t in choices]}}
    hub = {"answerKey": "B", "question": "Pick one?",
           "choices": {"label": [l for l, _ in choices], "text": [t for _, t in choices]}}
    expected = "Question: Pick one?\nA. ignore\nB. enforce\nC. yell at\nAnswer: B"
    assert format_csqa(official) == format_csqa(hub) == expected
    assert not format_csqa({**hub, "answerKey": ""}).endswith("Answer: ")


# -- packing -------------------------------------------------------------------------------------

def test_documents_end_with_eos_and_windows_overlap_by_one_token(make, text_file):
    dm = make(text_file)
    dm.setup()
    train = dm._splits["train"]
    stream = token_stream(dm, DOCS)
    assert train.tokens.tolist() == stream
    assert len(train) == (len(stream) - 1) // 8
    for i in (0, 1, len(train) - 1):
        item = train[i]
        assert item["input_ids"].tolist() == stream[i * 8 : i * 8 + 8]
        assert item["labels"].tolist() == stream[i * 8 + 1 : i * 8 + 9]
        assert item["input_ids"].dtype == torch.long


def test_blank_documents_are_left_out(make, tmp_path):
    """wikitext-style empty rows would each become a lone EOS, teaching EOS after EOS."""
    rows = [{"text": DOCS[0]}, {"text": ""}, {"text": " \n"}, {"text": DOCS[1]}]
    dm = make(write_jsonl(tmp_path / "gaps.jsonl", rows))
    assert dm.documents("train") == DOCS[:2]


def test_validation_holds_out_whole_documents_before_packing(make, text_file):
    dm = make(text_file, val_fraction=0.1)
    dm.setup()
    eos = dm.tokenizer.eos_token_id

    def documents(tokens: torch.Tensor) -> list[str]:
        pieces, current = [], []
        for t in tokens.tolist():
            if t == eos:
                pieces.append(dm.tokenizer.decode(current))
                current = []
            else:
                current.append(t)
        assert not current, "a split does not end at a document boundary"
        return pieces

    val, train = documents(dm._splits["val"].tokens), documents(dm._splits["train"].tokens)
    assert len(val) == 4 and len(train) == 36
    assert sorted(val + train) == sorted(DOCS)
    again = make(text_file, val_fraction=0.1)
    again.setup()
    assert torch.equal(again._splits["val"].tokens, dm._splits["val"].tokens)


def test_sequence_batches_have_the_configured_shape(make, text_file):
    batch = next(iter(make(text_file, seq_len=16, batch_size=3).train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 16)


# -- order: deterministic shuffle, rank shards, resume ------------------------------------------

def first_batch(dm: TextDataModule, epoch: int = 0) -> torch.Tensor:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return next(iter(loader))["input_ids"]


def test_shuffle_is_deterministic_per_seed_and_changes_each_epoch(make, text_file):
    a, b = make(text_file, seed=1), make(text_file, seed=1)
    assert torch.equal(first_batch(a), first_batch(b))
    assert not torch.equal(first_batch(a, epoch=0), first_batch(a, epoch=1))
    assert not torch.equal(first_batch(a), first_batch(make(text_file, seed=2)))


def test_validation_says_when_the_number_of_processes_drops_some_of_its_sequences(make, text_file):
    dm = make(text_file, val_fraction=0.1)
    dm.setup()
    n = len(dm._splits["val"])
    world = next(w for w in range(2, n + 2) if n % w)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=world)  # what the datamodule reads of its trainer
    with pytest.warns(UserWarning, match=f"validation scores {n // world * world} of its {n} sequences on {world}"):
        dm.val_dataloader()
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.val_dataloader()


def test_lightning_keeps_the_data_modules_sampler_on_several_processes(make, text_file):
    """Lightning's default use_distributed_sampler=True wraps a sampler that is no DistributedSampler in its own,
    which would shard the rank's share again: each of 2 processes would train on half its share (an epoch
    covering half the data), with no warning."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # use_distributed_sampler=True
    dm = make(text_file, val_fraction=0.25)
    dm.trainer = trainer
    for stage, split in ((RunningStage.TRAINING, "train"), (RunningStage.VALIDATING, "val")):
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=split == "train", mode=stage)
        assert list(prepared.sampler) == list(loader.sampler)
        assert len(loader.sampler) == len(dm._splits[split]) // 2


def test_ranks_get_disjoint_equal_shares():
    shares = [list(ResumableSampler(103, True, 0, rank, 3)) for rank in range(3)]
    assert {len(s) for s in shares} == {34}
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(103))


def test_resume_skips_the_consumed_batches_of_that_epoch_only():
    full = ResumableSampler(40, True, 7)
    full.set_epoch(2)
    order = list(full)
    resumed = ResumableSampler(40, True, 7)
    resumed.resume_from(epoch=2, consumed=12)
    resumed.set_epoch(2)
    assert list(resumed) == order[12:]
    assert len(resumed) == 40
    assert list(resumed) == order  # the skip applies once; the next pass is whole


@pytest.mark.parametrize("change", [{"seed": 2}, {"seq_len": 16}])
def test_resuming_into_another_order_of_the_data_says_the_rest_of_the_epoch_is_not_the_unseen_part(
        make, text_file, change):
    """The checkpoint's position counts sequences of its order: in another (a new data.seed, seq_len or data)
    skipping as many repeats some trained sequences and never trains others in the rest of that epoch."""
    before = make(text_file, seed=1)
    before.setup()
    before.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), world_size=1,
                                     fit_loop=SimpleNamespace(
        epoch_progress=SimpleNamespace(current=SimpleNamespace(started=1, processed=0)),  # inside epoch 0
        epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(processed=3)))))
    state = before.state_dict()
    same, other = make(text_file, seed=1), make(text_file, **{"seed": 1, **change})
    same.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.train_dataloader()
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match=r"data: the checkpoint stopped 6 sequences into epoch 0 of \d+ sequences "
                                         r"shuffled with data\.seed=1.*repeats"):
        other.train_dataloader()


@pytest.mark.parametrize("before, after", [(4, 2), (2, 4), (3, 3)])
def test_resume_on_another_number_of_ranks_repeats_nothing(before, after):
    """3 steps of batch 2 on `before` ranks, then the rest of the epoch on `after` ranks."""
    def shares(world, consumed=None):
        samplers = [ResumableSampler(51, True, 7, rank, world) for rank in range(world)]
        for s in samplers:
            if consumed is not None:
                s.resume_from(0, consumed)
            s.set_epoch(0)
        return [list(s) for s in samplers]

    trained = [i for share in shares(before) for i in share[:6]]
    rest = [i for share in shares(after, consumed=6 * before) for i in share]
    assert not set(trained) & set(rest) and len(set(rest)) == len(rest)
    assert len(trained) + len(rest) >= 51 - max(before, after)  # only an uneven tail is dropped
    if before == after:  # unchanged world: exactly the uninterrupted epoch
        assert shares(after, consumed=6 * before) == [share[6:] for share in shares(before)]


@pytest.mark.parametrize("before, after", [((1, 4), (2, 4)), ((2, 2), (4, 2)), ((1, 2), (1, 4)), ((4, 2), (2, 2)),
                                           ((2, 4), (2, 4))])
def test_a_resumed_epoch_runs_to_the_end_of_its_data(before, after):
    """(ranks, batch size) before and after a resume 3 steps into an epoch. Lightning resumes its per-rank
    batch counter at 3 and ends the epoch after len(loader) batches or when the data runs out: every
    remaining full batch must still be trained, the global batch having grown or shrunk."""
    (world, batch), (new_world, new_batch), done = before, after, 3
    consumed = done * batch * world
    for rank in range(new_world):
        sampler = ResumableSampler(96, True, 7, rank, new_world)
        sampler.resume_from(0, consumed, counted=done * new_batch)
        loader = DataLoader(range(96), batch_size=new_batch, sampler=sampler, drop_last=True)
        expected = (96 - consumed) // new_world // new_batch  # this rank's full batches in the rest of the epoch
        assert len(loader) - done >= expected  # Lightning's counter lets them all run
        assert len(list(loader)) == expected
        assert len(loader) >= 96 // new_world // new_batch  # and later epochs are not cut short


# -- caching -------------------------------------------------------------------------------------

def test_tokenisation_is_cached_on_disk_and_reused(make, text_file, tmp_path, monkeypatch):
    first = make(text_file)
    first.setup()
    cached = list((tmp_path / "cache").glob("tokens-*.arrow"))
    assert len(cached) == 1

    second = make(text_file, seq_len=4)
    tokenizer_class = type(second.tokenizer)
    monkeypatch.setattr(tokenizer_class, "__call__", lambda *a, **k: pytest.fail("tokenised again"))
    second.setup()
    assert torch.equal(second._splits["train"].tokens, first._splits["train"].tokens)

    monkeypatch.undo()
    make(text_file, max_documents=5).setup()  # other documents: another cache entry
    assert len(list((tmp_path / "cache").glob("tokens-*.arrow"))) == 2


# -- sources -------------------------------------------------------------------------------------

def test_txt_and_parquet_files_load(make, tmp_path):
    (tmp_path / "book.txt").write_text("\n".join(DOCS))
    txt = make(tmp_path / "book.txt")
    assert txt.documents("train") == ["\n".join(DOCS)]  # a text file is one document
    held_out = make(tmp_path / "book.txt", val_fraction=0.25)
    held_out.setup()
    whole = torch.cat([held_out._splits["train"].tokens, held_out._splits["val"].tokens]).tolist()
    assert whole == token_stream(txt, ["\n".join(DOCS)])  # its last quarter of tokens validates
    assert len(held_out._splits["val"].tokens) == round(len(whole) * 0.25)
    datasets.Dataset.from_dict({"body": DOCS}).to_parquet(str(tmp_path / "docs.parquet"))
    parquet = make(tmp_path / "docs.parquet", text_field="body")
    assert parquet.documents("train") == DOCS


def test_hub_ids_go_to_datasets_with_config_and_split(make, monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"question": ["q"], "answer": ["a\n#### 1"]})

    monkeypatch.setattr(data_module.datasets, "load_dataset", load_dataset)
    dm = make("openai/gsm8k", name="main", format="gsm8k", val_split="test")
    assert dm.documents("train") == ["Question: q\nAnswer: a\n#### 1"]
    assert calls == [("openai/gsm8k", "main", "train")]


def test_an_unreachable_hub_names_the_field_and_the_offline_fix(make, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(data_module.datasets, "load_dataset", offline)  # as datasets fails with no network
    with pytest.raises(ConnectionError, match=r"data\.path='openai/gsm8k' is a hub dataset .*set data\.init_args\.path"):
        make("openai/gsm8k", name="main", format="gsm8k").documents("train")


def test_the_real_gsm8k_train_file(make, gsm8k_train):
    docs = make(gsm8k_train, format="gsm8k").documents("train")
    assert len(docs) == 7473
    assert all(d.startswith("Question: ") and "\n#### " in d for d in docs)


def test_max_documents_takes_the_first_n(make, text_file):
    assert make(text_file, max_documents=5).documents("train") == DOCS[:5]


# -- bad input -----------------------------------------------------------------------------------

def test_a_text_field_missing_from_the_first_row_points_at_the_field_setting(make, tmp_path):
    path = write_jsonl(tmp_path / "body.jsonl", [{"body": "one"}, {"body": "two"}])
    with pytest.raises(ValueError, match=r"body\.jsonl:1: missing field 'text' \(found \['body'\]\); set "
                                         r"data\.init_args\.text_field"):
        make(path).documents("train")
    assert make(path, text_field="body").documents("train") == ["one", "two"]


def test_malformed_jsonl_row_names_file_and_line(make, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "one"}, {"text": "two"}, '{"text": "thr', {"text": "four"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON.*on_bad_row=skip"):
        make(path).documents("train")
    with pytest.warns(UserWarning, match=r"skipped 1 malformed rows \(first: .*bad\.jsonl:3\)"):
        assert make(path, on_bad_row="skip").documents("train") == ["one", "two", "four"]


def test_a_row_that_is_not_utf8_names_file_and_line(make, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "caf\xe9"}\n{"text": "three"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\).*on_bad_row=skip"):
        make(str(path)).documents("train")
    with pytest.warns(UserWarning, match=r"skipped 1 malformed rows"):
        assert make(str(path), on_bad_row="skip").documents("train") == ["one", "three"]


def test_a_jsonl_file_saved_with_a_utf8_byte_order_mark_reads_its_first_row(make, tmp_path):
    """Windows tools (Notepad, PowerShell 5's utf8) start a UTF-8 file with a BOM; `datasets` reads such a file."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\r\n')
    assert make(path).documents("train") == ["one", "two"]


def test_row_missing_a_field_names_the_field_and_line(make, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2"}])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: missing field 'answer'"):
        make(path, format="gsm8k").documents("train")


def test_a_validation_split_that_is_the_training_split_is_refused(make):
    with pytest.raises(ValueError, match=r"data\.val_split='train' is data\.split .*val_fraction"):
        make("openai/gsm8k", name="main", format="gsm8k", val_split="train")


def test_a_validation_split_of_a_single_file_is_refused(make, text_file):
    with pytest.raises(ValueError, match="data.val_split='test' .* single file .*val_fraction"):
        make(text_file, val_split="test")


def test_missing_file_names_data_path(make, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.path: .*nothing\.jsonl not found"):
        make(tmp_path / "nothing.jsonl").documents("train")


def test_a_file_of_an_unknown_kind_names_data_path_and_the_kinds_read(make, tmp_path):
    path = write_jsonl(tmp_path / "docs.ndjson", [{"text": d} for d in DOCS])
    with pytest.raises(ValueError, match=r"data\.path: .*docs\.ndjson is a file of no kind the data module reads "
                                         r"\(\.ndjson\).*jsonl/json/txt/parquet/csv"):
        make(path).documents("train")


def test_empty_file_is_an_error(make, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="has no documents"):
        make(tmp_path / "empty.jsonl").setup()


def test_too_little_data_for_one_sequence_is_an_error(make, tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "hi"}])
    with pytest.raises(ValueError, match=r"fewer than one sequence of data\.seq_len\+1=513"):
        make(path, seq_len=512).setup()


def test_too_few_sequences_for_a_batch_is_an_error(make, text_file):
    with pytest.raises(ValueError, match="no full batch of data.batch_size=4096"):
        make(text_file, batch_size=4096).train_dataloader()


def test_a_local_tokenizer_is_stored_with_its_absolute_path(smollm2_tokenizer_dir, monkeypatch):
    """Checkpoints carry the data module's settings; quietdepth-eval/-generate read the tokenizer from them
    in whatever folder they run."""
    monkeypatch.chdir(smollm2_tokenizer_dir.parent)
    data = TextDataModule(path="train.jsonl", tokenizer=smollm2_tokenizer_dir.name)
    assert data.hparams.tokenizer == str(smollm2_tokenizer_dir.resolve())
    assert TextDataModule(path="train.jsonl", tokenizer="HuggingFaceTB/SmolLM2-135M").hparams.tokenizer == (
        "HuggingFaceTB/SmolLM2-135M")  # a hub id stays a hub id


def test_a_tokenizer_that_cannot_be_loaded_names_the_field(make, text_file, tmp_path):
    (tmp_path / "no-tokenizer").mkdir()
    message = r"(?s)data\.tokenizer=.*no-tokenizer. cannot be loaded .*set data\.init_args\.tokenizer"
    with pytest.raises(ValueError, match=message):
        make(text_file, tokenizer=str(tmp_path / "no-tokenizer")).tokenizer


@pytest.mark.parametrize("field", ["seq_len", "batch_size", "max_documents"])
def test_a_size_below_one_names_its_field_and_value(make, text_file, field):
    with pytest.raises(ValueError, match=rf"data\.{field}=0 must be >= 1"):
        make(text_file, **{field: 0})
