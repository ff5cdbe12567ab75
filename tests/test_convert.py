"""Weights in and out of transformers, on tiny random Llama / Mistral / Qwen2 models."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeldefs import Transformer
from modeldefs.convert import config_from_hf, state_dict_from_hf
from modeldefs.generate import generate
from modeldefs.pretrained import export_hf, from_hf_model, load_pretrained, to_hf_model
from tests.conftest import file_size_limit

TINY_HF = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_hf(model_type: str, **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**TINY_HF, **overrides})
    if model_type == "mistral":
        config.sliding_window = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if model_type == "qwen2":  # HF zero-inits biases; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    return model


CASES = [("llama", {}), ("llama", {"tie_word_embeddings": True, "rope_theta": 5e5}),
         ("mistral", {}), ("qwen2", {})]


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_logits_match_transformers(model_type, overrides):
    hf = tiny_hf(model_type, **overrides)
    ours = from_hf_model(hf).eval()
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_greedy_generation_matches_transformers(model_type, overrides):
    hf = tiny_hf(model_type, **overrides)
    ours = from_hf_model(hf).eval()
    prompt = torch.randint(0, 128, (1, 6))
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 12), expected)


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_export_then_import_is_exact(model_type, overrides, tmp_path):
    ours = from_hf_model(tiny_hf(model_type, **overrides))
    export_hf(ours, tmp_path / "hf")
    reloaded = load_pretrained(str(tmp_path / "hf"))
    assert reloaded.config.qkv_bias == ours.config.qkv_bias
    for (name, a), (_, b) in zip(ours.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ours.eval()(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type,overrides", CASES)
def test_a_loaded_model_holds_the_source_weights_bit_for_bit_without_a_random_init(model_type, overrides):
    """The model is built without the random init its weights would overwrite (most of the time a load took),
    so loading draws nothing from torch's generator; the RoPE tables, which no state dict holds, are computed."""
    hf = tiny_hf(model_type, **overrides)
    rng = torch.get_rng_state()
    ours = from_hf_model(hf)
    assert torch.equal(torch.get_rng_state(), rng)
    source = state_dict_from_hf(hf.state_dict(), ours.config)
    loaded = ours.state_dict()
    assert loaded.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(loaded[name].view(torch.int32), tensor.view(torch.int32)), name
    fresh = Transformer(ours.config)
    assert torch.equal(ours.rope_cos, fresh.rope_cos) and torch.equal(ours.rope_sin, fresh.rope_sin)
    assert (ours.lm_head.weight is ours.embed.weight) == ours.config.tie_embeddings
    assert ours.training


def word_tokenizer(words: list[str], **special: str):
    """A word-level HF tokenizer over `words` (id = index), with the given special tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=words[0])), **special)


def test_an_export_gives_generate_the_special_tokens_of_its_tokenizer(tmp_path):
    """transformers' `generate` stops at and pads with the ids in generation_config.json, not config.json's."""
    tokenizer = word_tokenizer(["a", "b", "<pad>", "<s>", "</s>"], pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    export_hf(from_hf_model(tiny_hf("llama")), tmp_path / "hf", tokenizer)  # ids unlike LlamaConfig's defaults
    generation = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").generation_config
    assert (generation.pad_token_id, generation.bos_token_id, generation.eos_token_id) == (2, 3, 4)


def test_to_hf_model_keeps_untied_head_distinct():
    ours = from_hf_model(tiny_hf("llama"))
    hf = to_hf_model(ours)
    assert not hf.config.tie_word_embeddings
    assert torch.equal(hf.lm_head.weight, ours.lm_head.weight)


def test_unsupported_rope_scaling_is_refused():
    hf_config = AutoConfig.for_model("llama", **TINY_HF, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="rope scaling"):
        config_from_hf(hf_config)


def test_an_mlp_activation_other_than_silu_is_refused():
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf(AutoConfig.for_model("llama", **TINY_HF, hidden_act="gelu"))


def test_missing_sources_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_pretrained(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="x.ckpt"):
        load_pretrained(str(tmp_path / "x.ckpt"))


def test_exporting_a_mixture_of_depths_checkpoint_is_refused_and_writes_nothing(tmp_path, capsys):
    from modeldefs import ModelConfig, Transformer
    from training.export import main as export_main

    model = Transformer(ModelConfig.from_name("micro", n_layer=4, mod_capacity=0.5))
    checkpoint = tmp_path / "mod.ckpt"
    torch.save({"model_config": model.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(checkpoint), str(tmp_path / "out"), "--tokenizer", "none"])
    assert exit_info.value.code == 2
    assert "quietdepth-export: error: a Mixture-of-Depths model has no transformers equivalent" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_exporting_over_an_earlier_export_is_refused_unless_overwrite(tmp_path, capsys):
    from modeldefs import ModelConfig, Transformer
    from training.export import main as export_main

    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Transformer(ModelConfig.from_name("micro", n_layer=2))
        checkpoints.append(tmp_path / f"dense{seed}.ckpt")
        torch.save({"model_config": model.config.to_dict(),
                    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoints[-1])
    out = tmp_path / "out"
    export_main([str(checkpoints[0]), str(out), "--tokenizer", "none"])
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(checkpoints[1]), str(out), "--tokenizer", "none"])
    assert exit_info.value.code == 2
    assert "already holds an exported model (config.json, model.safetensors)" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first
    export_main([str(checkpoints[1]), str(out), "--tokenizer", "none", "--overwrite"])
    assert (out / "model.safetensors").read_bytes() != first


def test_an_overwrite_that_fails_midway_leaves_the_earlier_export_as_it_was(tmp_path, capsys):
    """--overwrite wrote the new files over the old one by one: a full disk midway left the new config.json beside
    the old export's tokenizer and new, half-written weights."""
    from modeldefs import ModelConfig, Transformer
    from training.export import main as export_main

    checkpoints = []
    for n_layer in (1, 2):
        model = Transformer(ModelConfig.from_name("micro", n_layer=n_layer))
        checkpoints.append(tmp_path / f"dense{n_layer}.ckpt")
        torch.save({"model_config": model.config.to_dict(),
                    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoints[-1])
    out = tmp_path / "out"
    export_main([str(checkpoints[0]), str(out), "--tokenizer", "none"])
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    with file_size_limit(len(earlier["model.safetensors"])), pytest.raises(SystemExit):  # the new weights are larger
        export_main([str(checkpoints[1]), str(out), "--tokenizer", "none", "--overwrite"])
    assert "File too large" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    export_main([str(checkpoints[1]), str(out), "--tokenizer", "none", "--overwrite"])
    assert load_pretrained(str(out)).config.n_layer == 2


def test_a_plain_export_over_a_quietstar_export_loads_as_the_plain_model(tmp_path):
    """The Quiet-STaR export's thoughts.safetensors and thought_config.json must not outlive it: beside the new
    weights they would wrap the plain model in the old thoughts."""
    from modeldefs.quietstar import QuietStar, ThoughtConfig

    plain = from_hf_model(tiny_hf("llama"))
    export_hf(QuietStar(from_hf_model(tiny_hf("llama")), ThoughtConfig(), init_token_id=0), tmp_path / "hf")
    export_hf(plain, tmp_path / "hf")
    reloaded = load_pretrained(str(tmp_path / "hf"))
    assert type(reloaded) is type(plain)
    assert reloaded.state_dict().keys() == plain.state_dict().keys()


def test_exporting_a_quietstar_model_says_transformers_gets_the_language_model_alone(tmp_path, capsys):
    from modeldefs.quietstar import QuietStar, ThoughtConfig
    from training.export import main as export_main

    export_hf(QuietStar(from_hf_model(tiny_hf("llama")), ThoughtConfig(), init_token_id=0), tmp_path / "qs")
    export_main([str(tmp_path / "qs"), str(tmp_path / "again"), "--tokenizer", "none"])
    assert "transformers loads the language model alone" in capsys.readouterr().out
