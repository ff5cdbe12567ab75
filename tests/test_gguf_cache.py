"""The GGUF conversion cache: entry names, atomic parts, and SmolLM2 loading from it bit-exactly."""

from __future__ import annotations

import os

import gguf
import pytest
import torch

from modeldefs.gguf_cache import cache_entry, store
from modeldefs.pretrained import (OFFLINE_DEFAULT, from_hf_model, load_hf_model, load_pretrained, load_tokenizer,
                                  smollm2_gguf_path)
from tests.conftest import requires_smollm2


def test_an_entry_is_named_after_the_file_and_changes_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QUIETDEPTH_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    entry = cache_entry(model)
    assert entry.parent == tmp_path / "cache" / "gguf" and entry.name.startswith("m-")
    assert cache_entry(model) == entry
    model.write_bytes(b"GGUF" + bytes(61))  # another size
    resized = cache_entry(model)
    assert resized != entry
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, modified later
    assert cache_entry(model) not in (entry, resized)
    monkeypatch.setenv("QUIETDEPTH_CACHE", "off")
    assert cache_entry(model) is None
    monkeypatch.delenv("QUIETDEPTH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_entry(model).parent == tmp_path / "home" / ".cache" / "quietdepth" / "gguf"


def test_a_part_appears_whole_and_the_first_one_stored_stays(tmp_path):
    entry = tmp_path / "entry"
    store(entry, "model", lambda folder: (folder / "weights").write_text("first"))
    store(entry, "model", lambda folder: (folder / "weights").write_text("second"))  # a second rank, later
    assert (entry / "model" / "weights").read_text() == "first"
    assert sorted(p.name for p in entry.iterdir()) == ["model"]  # no temporary folder left behind


def test_a_failed_write_warns_and_stores_nothing(tmp_path):
    def disk_full(folder):
        (folder / "weights").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.warns(UserWarning, match="converted again next time"):
        store(tmp_path / "entry", "model", disk_full)
    assert list((tmp_path / "entry").iterdir()) == []


def test_a_write_interrupted_by_ctrl_c_leaves_no_half_written_folder_behind(tmp_path):
    """Converting SmolLM2 writes ~0.5 GB; a hidden temporary folder left by each interrupt stayed in the cache."""
    def interrupted(folder):
        (folder / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store(tmp_path / "entry", "model", interrupted)
    assert list((tmp_path / "entry").iterdir()) == []


@requires_smollm2
def test_smollm2_and_its_tokenizer_load_from_the_cache_without_reading_the_gguf(smollm2_hf, monkeypatch):
    expected = from_hf_model(smollm2_hf).state_dict()
    load_pretrained(OFFLINE_DEFAULT)  # converts the GGUF, unless this session did already
    converted_tokenizer = load_tokenizer(OFFLINE_DEFAULT)
    entry = cache_entry(smollm2_gguf_path())
    assert (entry / "model" / "config.json").is_file() and (entry / "tokenizer").is_dir()

    class NoReading:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("the GGUF file was read")

    monkeypatch.setattr(gguf, "GGUFReader", NoReading)
    with pytest.raises(AssertionError, match="GGUF file was read"):  # the guard works
        load_hf_model(OFFLINE_DEFAULT)
    model = load_pretrained(OFFLINE_DEFAULT)
    state = model.state_dict()
    assert model.config.name == "smollm2-135m-instruct" and state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    tokenizer = load_tokenizer(OFFLINE_DEFAULT)
    text = "<|im_start|>user\nJanet has 12,345 apples; she sells 3/4 of them.<|im_end|>"
    assert tokenizer(text).input_ids == converted_tokenizer(text).input_ids
    assert tokenizer.chat_template == converted_tokenizer.chat_template
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        converted_tokenizer.bos_token_id, converted_tokenizer.eos_token_id, converted_tokenizer.pad_token_id)
