"""The lm-evaluation-harness model type `quietdepth`: its scores equal our scorer's and a plain forward
pass, generation honours lm-eval's stop strings, and lm-eval runs the local task YAMLs through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is an optional extra: pip install -e '.[lmeval]'")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from evals import csqa, scoring  # noqa: E402
from evals.decoding import DecodingConfig, generate, generate_tokens  # noqa: E402
from evals.lm_eval_adapter import QuietdepthLM  # noqa: E402
from evals.model import EvalModel  # noqa: E402
from modeldefs import ModelConfig, Transformer  # noqa: E402
from tests.conftest import shared_file  # noqa: E402
from tests.test_eval_decoding import ByteTokenizer  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "evals" / "lm_eval_tasks"


@pytest.fixture
def model() -> EvalModel:
    torch.manual_seed(0)
    net = Transformer(ModelConfig.from_name("micro")).eval()
    return EvalModel(net, ByteTokenizer(), torch.device("cpu"), torch.float32, "micro-random")


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("Question: where?\nAnswer:", " A"), ("Question: where?\nAnswer:", " B"),
         ("Question: where?\nAnswer: ", "a bank"), ("", "hello"), ("x" * 300, " long context")]


def full_forward_loglikelihood(model: EvalModel, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The textbook computation: one forward over context + continuation, no cache, no batching."""
    ids = ([*context, *continuation])[-(model.block_size + 1):]
    logprobs = model.net(torch.tensor([ids[:-1]])).log_softmax(-1)[0, -len(continuation):]
    target = torch.tensor(continuation)
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_quietdepth_is_a_registered_lm_eval_model_type_beside_lm_eval_own():
    assert get_model("quietdepth") is QuietdepthLM
    assert get_model("hf").__name__ == "HFLM"  # registering ours must not hide lm-eval's built-in types


def test_a_quietstar_model_scores_with_its_thoughts_when_decoding_thoughts():
    from tests.test_eval_decoding import quietstar_model

    qs = quietstar_model()
    pairs = scoring.encode_pairs(qs, PAIRS[:3])
    lm = QuietdepthLM(qs, decoding="thoughts")
    thinking = lm.loglikelihood(requests("loglikelihood", PAIRS[:3]), disable_tqdm=True)
    assert thinking == scoring.loglikelihood(qs, pairs, think=True)
    assert thinking != scoring.loglikelihood(qs, pairs)
    with pytest.raises(ValueError, match="decoding=greedy"):
        lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("hi",)]))


def test_cuda_graph_model_arg_takes_lm_evals_true_and_false_strings(model):
    assert QuietdepthLM(model, cuda_graph="False").cuda_graph is False
    assert QuietdepthLM(model, cuda_graph="true").cuda_graph is True
    with pytest.raises(ValueError, match="cuda_graph='maybe'"):
        QuietdepthLM(model, cuda_graph="maybe")


def test_cuda_graph_false_reaches_generation_as_the_sliced_step(model, monkeypatch):
    """cuda_graph=false decodes with the sliced step everywhere (fixed_step False); the default leaves the choice
    to the device (None: a graph on a GPU). On a CPU both decode alike, so the value is read where it arrives."""
    from evals import decoding

    seen: list[bool | None] = []
    rows = decoding._decode_rows
    monkeypatch.setattr(decoding, "_decode_rows", lambda *a, **kw: seen.append(kw["fixed_step"]) or rows(*a, **kw))
    args = [("Hi", {"until": [], "max_gen_toks": 2})]
    for graph in ("false", "true"):
        QuietdepthLM(model, cuda_graph=graph).generate_until(requests("generate_until", args), disable_tqdm=True)
    assert seen == [False, None]


def test_loglikelihood_equals_our_scorer_and_a_plain_full_forward(model):
    lm = QuietdepthLM(model, batch_size=2)
    got = lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    pairs = scoring.encode_pairs(model, PAIRS)
    assert got == scoring.loglikelihood(model, pairs, batch_size=2)
    for (logprob, greedy), (context, continuation) in zip(got, pairs):
        expected, expected_greedy = full_forward_loglikelihood(model, context or [model.prefix_token_id], continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_a_trailing_space_of_the_context_moves_to_the_continuation(model):
    lm = QuietdepthLM(model)
    spaced, moved = lm.loglikelihood(requests("loglikelihood", [("Answer: ", "yes"), ("Answer:", " yes")]),
                                     disable_tqdm=True)
    assert spaced == moved


def test_loglikelihood_rolling_is_the_whole_text_from_the_prefix_token(model):
    text = "The quick brown fox jumps over the lazy dog. " * 5  # 225 bytes: two windows of block_size 128
    (total,) = QuietdepthLM(model).loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    tokens = [model.prefix_token_id, *model.encode(text)]
    first, _ = full_forward_loglikelihood(model, tokens[:1], tokens[1:129])
    second, _ = full_forward_loglikelihood(model, tokens[:129], tokens[129:])
    assert total == pytest.approx(first + second, abs=1e-3)


def test_generate_until_stops_at_until_and_honours_max_gen_toks(model):
    lm = QuietdepthLM(model)
    prompts = ["Question: 1+1?\nAnswer:", "Hi"]
    free = generate(model, [model.encode(p) for p in prompts], max_new_tokens=30)[0]
    (first7,) = generate_tokens(model, [model.encode(prompts[0])], max_new_tokens=7)
    stop = free[4:6]
    args = [(p, {"until": [stop], "max_gen_toks": 30, "do_sample": False}) for p in prompts]
    args.append((prompts[0], {"until": "never-produced", "max_gen_toks": 7}))
    args.append((prompts[0], {"until": ["", "never-produced"], "max_new_tokens": 7}))  # lm-eval's alias; "" ignored
    out = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert out[0] == free[:free.index(stop)]
    assert stop not in out[1]
    assert out[2] == out[3] == model.decode(first7) and len(first7) == 7


def test_sampling_requests_are_refused_with_the_override(model):
    with pytest.raises(ValueError, match="do_sample=False"):
        QuietdepthLM(model).generate_until(requests("generate_until", [("Hi", {"until": [], "do_sample": True})]))


def test_lm_eval_local_commonsense_qa_requests_are_our_letter_prompts_scoring_the_letters():
    """The task YAML renders `evals.csqa`'s prompt, scores " A" ... " E" and takes the answer key as gold."""
    from lm_eval.tasks import TaskManager, get_task_dict

    questions = csqa.load(str(shared_file("commonsense_qa/dev_rand_split.jsonl")))[:6]
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)
    task = get_task_dict(["commonsense_qa_local"], tasks)["commonsense_qa_local"]
    task.build_all_requests(limit=len(questions))
    theirs = sorted(task.instances, key=lambda request: (request.doc_id, request.idx))
    assert [request.args for request in theirs] == [
        (csqa.letter_prompt(q), f" {letter}") for q in questions for letter in csqa.LETTERS]
    docs = [request.doc for request in theirs[::len(csqa.LETTERS)]]
    # lm-eval takes a target that is a choice's text or its index
    gold = [task.doc_to_choice(doc).index(t) if isinstance(t := task.doc_to_target(doc), str) else t for doc in docs]
    assert gold == [csqa.LETTERS.index(q.answer) for q in questions]


def test_lm_eval_runs_the_local_commonsense_qa_tasks_through_the_adapter_to_our_own_results(model):
    """lm-eval's letter and cloze tasks score each question as `evals.csqa` does, to the same accuracy."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    questions = csqa.load(str(shared_file("commonsense_qa/dev_rand_split.jsonl")))[:6]
    lm = QuietdepthLM(model, batch_size=4)
    out = simple_evaluate(model=lm, tasks=["commonsense_qa_local", "commonsense_qa_cloze_local"], limit=len(questions),
                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    for task, ours in [("commonsense_qa_local", "csqa"), ("commonsense_qa_cloze_local", "csqa_cloze")]:
        result = csqa.evaluate(model, questions, ours, DecodingConfig(batch_size=4), progress=False)
        theirs = sorted(out["samples"][task], key=lambda sample: sample["doc_id"])
        # per question, not just the mean: the same letters/choices scored to the same log-likelihoods
        scores = [[loglikelihood for loglikelihood, _ in sample["filtered_resps"]] for sample in theirs]
        assert scores == [sample["scores"] for sample in result.samples]
        for metric in result.metrics:
            assert out["results"][task][f"{metric.name},none"] == pytest.approx(metric.value)


def test_lm_eval_default_cuda_device_falls_back_to_the_cpu_and_misspelled_model_args_are_refused(
        tmp_path, smollm2_tokenizer_dir, monkeypatch):
    net = Transformer(ModelConfig.from_name("tiny", n_layer=1, block_size=64))
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"model_config": net.config.to_dict(),
                "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, checkpoint)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine: the case of one without
    extra = {"batch_size": 2, "max_batch_size": None, "device": "cuda:0"}  # what lm-eval passes by default
    with pytest.warns(UserWarning, match="device='cuda:0' but CUDA is not available: running on the CPU"):
        lm = get_model("quietdepth").create_from_arg_string(f"pretrained={checkpoint},tokenizer={smollm2_tokenizer_dir}", extra)
    assert lm.model.device.type == "cpu" and next(lm.model.net.parameters()).device.type == "cpu"
    with pytest.raises(TypeError, match=r"unknown model arg\(s\) batchsize, pretrianed for --model quietdepth; it "
                                        r"takes pretrained, tokenizer, device, dtype, batch_size, decoding, "):
        get_model("quietdepth").create_from_arg_string(f"pretrianed={checkpoint},batchsize=8", extra)
    with pytest.raises(TypeError, match=r"unknown model arg\(s\) batchsize for --model quietdepth"):
        get_model("quietdepth").create_from_arg_obj({"batchsize": 8}, extra)  # lm-eval's command line's way


def test_a_data_folder_given_for_the_local_tasks_must_hold_their_files(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_task_data", TASKS / "data.py")
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/gsm8k/train.jsonl, .*test.jsonl not found"):
        data.gsm8k(data_dir=str(tmp_path))
    monkeypatch.setenv("QUIETDEPTH_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dev_rand_split.jsonl not found: .*QUIETDEPTH_SHARED_DATA"):
        data.commonsense_qa()
