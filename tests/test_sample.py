"""`quietdepth-generate`: what it prints is the model's own continuation (dense, Mixture-of-Depths, Quiet-STaR),
sampling is seeded, routed layers are counted, and settings that would be ignored are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from evals.model import load_eval_model
from evals.sample import main
from modeldefs import ModelConfig, Transformer
from modeldefs.generate import generate
from modeldefs.quietstar import QuietStar, ThoughtConfig
from modeldefs.thought_generate import generate_with_thoughts

PROMPT = "Natalia sold clips to 48 of her friends"


def save(model: Transformer | QuietStar, path: Path) -> Path:
    """A checkpoint as training writes one (model_config [+ thought_config] and `model.` keys)."""
    lm = model.lm if isinstance(model, QuietStar) else model
    state = {"model_config": lm.config.to_dict(), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    if isinstance(model, QuietStar):
        state["thought_config"] = model.thought_config.to_dict()
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sample")
    tiny = dict(n_layer=2, block_size=256, init_std=0.3)  # sharp enough that greedy continuations vary
    return {
        "dense": save(Transformer(ModelConfig.from_name("tiny", **tiny)), root / "dense.ckpt"),
        "mod": save(Transformer(ModelConfig.from_name("tiny", mod_capacity=0.5, mod_exempt_last=False, **tiny)),
                    root / "mod.ckpt"),
        "thoughts": save(QuietStar(Transformer(ModelConfig.from_name("tiny", **tiny)),
                                   ThoughtConfig(n_ahead=4, n_ahead_talk=2), init_token_id=7), root / "qs.ckpt"),
    }


def printed_completions(capsys: pytest.CaptureFixture, prompt: str = PROMPT) -> list[str]:
    """The completions printed after the prompt (stdout is not a terminal: no bold codes)."""
    blocks = re.findall(r"--- prompt \d+(?:, sample \d+)? ---\n(.*?)\n\n(?=--- prompt |\d+ tokens)",
                        capsys.readouterr().out, flags=re.DOTALL)
    assert all(b.startswith(prompt) for b in blocks)
    return [b[len(prompt):] for b in blocks]


def expected(source: Path, tokenizer: Path, decode, **kwargs) -> str:
    model = load_eval_model(str(source), str(tokenizer))
    ids = torch.tensor([model.encode(PROMPT)])
    out = decode(model, ids, **kwargs)[0, ids.size(1):].tolist()
    return model.decode(out[:out.index(model.eos_id)] if model.eos_id in out else out, skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["dense", "mod"])
def test_prints_the_greedy_continuation_of_the_model(checkpoints, smollm2_tokenizer_dir, capsys, kind):
    main(["--model", str(checkpoints[kind]), "--tokenizer", str(smollm2_tokenizer_dir), "--prompt", PROMPT,
          "--max-new-tokens", "12"])
    want = expected(checkpoints[kind], smollm2_tokenizer_dir, lambda m, ids: generate(m.lm, ids, 12, eos_id=m.eos_id))
    assert want.strip() and printed_completions(capsys) == [want]


@pytest.mark.parametrize("router_bias, routed_share", [(100.0, 1), (-100.0, 0)], ids=["every-token", "no-token"])
def test_routed_layers_count_every_token_they_saw(checkpoints, smollm2_tokenizer_dir, tmp_path, capsys, router_bias,
                                                  routed_share):
    # A router bias of +-100 outweighs any logit of the tiny model: every token is routed, or none is,
    # so the processed count is known exactly rather than only bounded.
    state = torch.load(checkpoints["mod"], weights_only=True)
    for name, value in state["state_dict"].items():
        if name.endswith("router.bias"):
            value.fill_(router_bias)
    forced = tmp_path / "forced.ckpt"
    torch.save(state, forced)
    main(["--model", str(forced), "--tokenizer", str(smollm2_tokenizer_dir), "--prompt", PROMPT,
          "--prompt", "Weng earns", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "routed layer" in line]
    assert len(lines) == 1 and "routed layer 1:" in lines[0]  # of tiny's 2 layers; the first is exempt
    model = load_eval_model(str(forced), str(smollm2_tokenizer_dir))
    # KV-cached decoding reads a prompt at once, then one token per step: prompt + 4 tokens through each layer
    seen = sum(len(model.encode(p)) + 4 for p in (PROMPT, "Weng earns"))
    routed, total = (int(w) for w in lines[0].split("processed ")[1].split(" tokens")[0].split(" of "))
    assert (routed, total) == (routed_share * seen, seen)


def test_a_thought_model_thinks_unless_told_not_to(checkpoints, smollm2_tokenizer_dir, capsys):
    args = ["--model", str(checkpoints["thoughts"]), "--tokenizer", str(smollm2_tokenizer_dir), "--prompt", PROMPT,
            "--max-new-tokens", "6"]
    main(args)
    thinking = expected(checkpoints["thoughts"], smollm2_tokenizer_dir,
                        lambda m, ids: generate_with_thoughts(m.net, ids, 6, eos_id=m.eos_id))
    assert printed_completions(capsys) == [thinking]
    main([*args, "--no-thoughts"])
    plain = expected(checkpoints["thoughts"], smollm2_tokenizer_dir, lambda m, ids: generate(m.lm, ids, 6, eos_id=m.eos_id))
    assert printed_completions(capsys) == [plain]


def test_samples_follow_the_seed(checkpoints, smollm2_tokenizer_dir, capsys):
    args = ["--model", str(checkpoints["dense"]), "--tokenizer", str(smollm2_tokenizer_dir), "--prompt", PROMPT,
            "--max-new-tokens", "8", "--temperature", "1.0", "--top-k", "100", "--num-samples", "3"]
    main([*args, "--seed", "1"])
    first = printed_completions(capsys)
    main([*args, "--seed", "1"])
    assert printed_completions(capsys) == first and len(first) == 3 and len(set(first)) > 1
    main([*args, "--seed", "2"])
    assert printed_completions(capsys) != first


def test_chat_wraps_the_prompt_in_the_template(checkpoints, smollm2_tokenizer_dir, capsys):
    main(["--model", str(checkpoints["dense"]), "--tokenizer", str(smollm2_tokenizer_dir), "--prompt", PROMPT,
          "--max-new-tokens", "6", "--chat"])
    model = load_eval_model(str(checkpoints["dense"]), str(smollm2_tokenizer_dir))
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                               add_generation_prompt=True)
    ids = torch.tensor([model.encode(text)])
    out = generate(model.lm, ids, 6, eos_id=model.eos_id)[0, ids.size(1):].tolist()
    want = model.decode(out[:out.index(model.eos_id)] if model.eos_id in out else out, skip_special_tokens=True)
    assert printed_completions(capsys) == ["\n" + want]  # the shown prompt is the user's text; the answer on a new line


@pytest.mark.parametrize("extra, message", [
    ([], "give a prompt"),
    (["--prompt", "x", "--num-samples", "2"], "equal completions: set --temperature > 0"),
    (["--prompt", "x", "--top-k", "5"], "greedy decoding (--temperature 0, the default) ignores them"),
    (["--prompt", "x", "--model", "{thoughts}", "--top-k", "5", "--temperature", "1"], "add --no-thoughts"),
    (["--prompt", "x", "--max-new-tokens", "300"], "exceeds block_size=256"),
    (["--prompt", "x", "--model", "{missing}"], "cannot load model"),
    (["--prompt", "x", "--device", "gpu"], "--device gpu: not a device torch knows"),
])
def test_settings_that_cannot_run_are_clear_errors(checkpoints, smollm2_tokenizer_dir, tmp_path, capsys, extra, message):
    names = {"thoughts": checkpoints["thoughts"], "missing": tmp_path / "missing.ckpt"}
    extra = [e.format(**names) for e in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(checkpoints["dense"]), "--tokenizer", str(smollm2_tokenizer_dir), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_completion_keeps_the_space_a_sentencepiece_tokenizer_drops_from_a_first_token(tmp_path, capsys):
    """A Metaspace decoder (SentencePiece: Llama, Mistral) drops the space of the first token it decodes, so the
    completion decoded alone would be glued to the prompt ('Natalia soldclips'); it is printed as the text it
    adds to the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Natalia", "sold", "clips", "to", "her", "friends", "in", "April", "May", "and"]
    vocab = {"<unk>": 0, "</s>": 1, **{"\u2581" + w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    backend.decoder = decoders.Metaspace(prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", n_layer=1, vocab_size=len(vocab), init_std=0.3))
    with torch.no_grad():
        model.embed.weight[:2] = 0  # (tied head) <unk> and </s> never win: every new token is a word
    checkpoint = save(model, tmp_path / "sp.ckpt")
    main(["--model", str(checkpoint), "--tokenizer", str(tmp_path / "tokenizer"), "--prompt", "Natalia sold",
          "--max-new-tokens", "4"])
    (printed,) = printed_completions(capsys, "Natalia sold")
    assert len(printed.split()) == 4 and printed.startswith(" ") and printed.split()[0] in words
