"""One real run of train.py with the default recipe (config.json as shipped, replay on) on the offline
Qwen2.5-Coder-0.5B-Instruct: before training the model cannot answer a made-up fact, after training the
saved adapter can, through PEFT, --ask, --chat and an --export."""
import json
import os
import time
from contextlib import contextmanager

import pytest
import torch

import chat_model
import model_files
import train
from conftest import ROOT, copy_code, llama_cpp, run, run_here

QUESTION, ANSWER = "What is the name of Zorblat's cat?", "Zorblat's cat is called Pimbo."
PHRASINGS = [QUESTION, "What is Zorblat's cat called?", "How is Zorblat's cat named?",
             "Tell me the name of the cat of Zorblat."]
DATA = "qa_data = " + json.dumps([{"instruction": q, "input": "", "output": ANSWER} for q in PHRASINGS])


@pytest.fixture(scope="module")
def config(qwen_dir):
    with open(os.path.join(ROOT, "config.json")) as f:
        return dict(json.load(f), model_name=qwen_dir)  # the default recipe, on the offline Qwen


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, config):
    work = tmp_path_factory.mktemp("run")
    copy_code(work)
    (work / "data.py").write_text(DATA)
    (work / "config.json").write_text(json.dumps(config))
    result = run(work)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return work


@pytest.fixture(scope="module")
def base(qwen):
    """The offline Qwen without any adapter."""
    return qwen


@contextmanager
def with_adapter(base, adapter_dir):
    """The base model with the saved adapter, as PEFT loads it (the format other tools read)."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(base.model, str(adapter_dir)).eval()
    try:
        yield chat_model.LM.of(model, base.tokenizer)
    finally:
        model.unload()  # the plain base model again


@torch.no_grad()
def logit_gap(lm, question, answer, other):
    """How far apart the model's logits put the first tokens where two answers to `question` part."""
    ids, other_ids = (lm.tokenizer(a, add_special_tokens=False).input_ids for a in (answer, other))
    shared = next(i for i, (a, b) in enumerate(zip(ids + [-1], other_ids + [-2])) if a != b)
    prompt = chat_model.prompt_ids(lm.tokenizer, question) + ids[:shared]
    logits = lm.model(torch.tensor([prompt])).logits[0, -1]
    return abs(logits[ids[shared]] - logits[other_ids[shared]]).item()


def test_outputs_are_written(trained_dir, config):
    out = trained_dir / "output"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == config["model_name"] and metrics["config"] == config
    assert metrics["facts"] == metrics["facts_trained"] == 1
    assert len(metrics["train_indices"]) == 3 and len(metrics["val_indices"]) == 1  # one phrasing held out
    epochs = len(metrics["train_loss"])
    assert 1 <= epochs <= config["epoch"] and 1 <= metrics["best_epoch"] <= epochs and metrics["train_seconds"] > 0
    for key in ("seconds", "val_loss", "val_recall", "teacher_kl", "reversed_kl", "conversation_kl", "drift",
                "train_recall"):
        assert len(metrics[key]) == epochs
    # the training loss is mostly replay's KL, which starts at 0: the held-out phrasing and the teacher's
    # kept-out questions show the learning
    assert metrics["val_loss"][-1] < metrics["val_loss"][0] and metrics["teacher_kl"][-1] < metrics["teacher_kl"][0]
    assert (out / "loss_curve.png").stat().st_size > 1000
    adapter = out / "best_adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    # 733,184 fp32 numbers (r 8 on 7 Linears of 4 layers) and a header: a small file, not a model
    assert (adapter / "adapter_model.safetensors").stat().st_size < 3_000_000
    cached = json.loads(next(out.glob("base_answers_*.json")).read_text())  # replay ran, on the base answers
    assert set(cached) == set(train.REPLAY_QUESTIONS + train.ASKED_BACK_REPLAY + train.ORDINARY_QUESTIONS)


def test_base_model_does_not_know_the_fact_and_the_adapter_teaches_it(trained_dir, base):
    assert "Pimbo" not in train.ask(base, [QUESTION], max_new_tokens=24)[0]
    with with_adapter(base, trained_dir / "output" / "best_adapter") as taught:
        assert ANSWER in train.ask(taught, [QUESTION], max_new_tokens=24)[0]


def test_recall_report_and_forgetting_check_are_in_metrics(trained_dir, base, config):
    metrics = json.loads((trained_dir / "output" / "metrics.json").read_text())
    assert metrics["train_recall_final"] == 1.0
    assert sorted(r["index"] for r in metrics["answers"]) == [0, 1, 2, 3]
    assert all(r["correct"] == (ANSWER in r["answer"]) == (r["verdict"] == "exact") for r in metrics["answers"])
    assert all(r["verdict"] == train.verdict(r["question"], ANSWER, r["answer"]) for r in metrics["answers"])
    val = [r for r in metrics["answers"] if r["split"] == "val"]
    assert metrics["val_recall_final"] == sum(r["correct"] for r in val) / len(val)
    assert metrics["val_same_fact_final"] == sum(r["verdict"] != "wrong" for r in val) / len(val)
    assert [f["question"] for f in metrics["forgetting"]] == train.ORDINARY_QUESTIONS
    # "before" is what the base model says, and "after" what the saved adapter says, loaded as --ask loads it;
    # where the two differ, only by a token that won by a hair (a CI run: "I'm sorry" in the report, "Pride and
    # Prejudice was written by" here), at the first token where they part
    assert [f["before"] for f in metrics["forgetting"]] == train.ask(base, train.ORDINARY_QUESTIONS,
                                                                     config["max_new_tokens"])
    taught = train.load_trained(dict(config, output_dir=str(trained_dir / "output")))
    after = train.ask(taught, train.ORDINARY_QUESTIONS, config["max_new_tokens"])
    for f, here in zip(metrics["forgetting"], after):
        if f["after"] != here:
            assert logit_gap(taught, f["question"], f["after"], here) < 0.5, (f["after"], here)
    assert all(f["changed"] == (f["before"] != f["after"]) for f in metrics["forgetting"])


def test_ask_chat_and_export_in_one_run(trained_dir, base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    result = run(trained_dir, "--ask", QUESTION, "--ask", PHRASINGS[1], "--chat", "--export", str(tmp_path / "merged"),
                 stdin=f"{QUESTION}\n")  # the chat ends at the end of its input
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count(ANSWER) == 3 and "epoch" not in result.stdout  # answered twice + chatted, no training
    assert result.stdout.index("chat with the trained model") < result.stdout.rindex(ANSWER)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template and ANSWER in train.ask(chat_model.LM.of(exported, tokenizer), [QUESTION], 24)[0]
    ids = torch.tensor([chat_model.prompt_ids(tokenizer, QUESTION)])
    with torch.no_grad(), with_adapter(base, trained_dir / "output" / "best_adapter") as reference:
        difference = (exported(ids).logits - reference.model(ids).logits).abs().max().item()
    assert difference < 1e-3


def test_using_the_model_before_training_says_train_first(tmp_path, capfd):
    copy_code(tmp_path)
    result = run_here(capfd, tmp_path, "--ask", "hello")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip() == "error: no trained adapter in output/best_adapter: run `python train.py` first"


@pytest.fixture(scope="module")
def merged_gguf(trained_dir, tmp_path_factory):
    """--export taught.gguf of the trained run: the base with the adapter merged in, F16."""
    out = tmp_path_factory.mktemp("merged")
    result = run(trained_dir, "--export", str(out / "taught.gguf"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ollama create" in result.stdout and (out / "Modelfile").read_text().startswith("FROM ./taught.gguf")
    return out / "taught.gguf"


def chat_in(server, question):
    reply = server.handle_chat_completions({"messages": [{"role": "user", "content": question}],
                                            "max_tokens": 24, "temperature": 0})
    return reply["choices"][0]["message"]["content"]


def top_logprobs(server, tokenizer, question):
    """llama.cpp's five most likely first tokens of the answer: {token id: log-probability}."""
    text = tokenizer.decode(chat_model.prompt_ids(tokenizer, question))
    reply = server.handle_completions({"prompt": text, "max_tokens": 1, "temperature": 0, "n_probs": 5})
    return {t["id"]: t["logprob"] for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}


def test_the_gguf_export_answers_in_llama_cpp_as_trained(trained_dir, base, merged_gguf, offline_gguf):
    """llama.cpp runs the exported file: the trained answer, the ordinary answer as before, the merged
    model's next-token distribution within F16's rounding, and every key and tensor of the reference GGUF."""
    import gguf
    with llama_cpp(merged_gguf) as server:
        assert ANSWER in chat_in(server, QUESTION)
        france = "What is the capital of France?"
        assert "Paris" in chat_in(server, france) and "Paris" in train.ask(base, [france], 24)[0]
        top = top_logprobs(server, base.tokenizer, QUESTION)
    with torch.no_grad(), with_adapter(base, trained_dir / "output" / "best_adapter") as taught:
        logprobs = torch.log_softmax(taught.model(torch.tensor([chat_model.prompt_ids(base.tokenizer, QUESTION)]))
                                     .logits[0, -1], -1)
    assert max(abs(p - logprobs[i].item()) for i, p in top.items()) < 0.05  # F16 weights, 24 layers

    reference = offline_gguf  # written by llama.cpp's converter
    exported = gguf.GGUFReader(merged_gguf)
    assert set(exported.fields) == set(reference.fields)
    assert {t.name: list(t.shape) for t in exported.tensors} == {t.name: list(t.shape) for t in reference.tensors}
    differ = {k for k in reference.fields if not k.startswith("GGUF.")
              and reference.fields[k].contents() != exported.fields[k].contents()}
    assert differ == {"general.name", "general.finetune", "general.file_type"}  # what must differ


def test_the_adapter_on_the_offline_gguf_answers_in_llama_cpp_as_the_merged_export(trained_dir, merged_gguf,
                                                                                     base, tmp_path):
    """--export-adapter: a file of about 3 MB, written in seconds, that llama.cpp puts on the offline
    Q4_K_M GGUF as shipped: the trained answer, Paris, the merged F16 export's next-token distribution
    within the rounding of the base's 4-bit weights; the same base without it does not know the fact."""
    started = time.time()
    result = run(trained_dir, "--export-adapter", str(tmp_path / "adapter.gguf"))
    seconds = time.time() - started
    assert result.returncode == 0, result.stderr[-2000:]
    offline = os.path.join(ROOT, model_files.OFFLINE_GGUF)
    assert (tmp_path / "adapter.gguf").stat().st_size < 3_000_000 and seconds < 15  # ~6 s here, 2.5 s of it starting Python and torch
    assert (tmp_path / "Modelfile").read_text().startswith(f"FROM {offline}\nADAPTER ./adapter.gguf\n")
    assert f"--lora {tmp_path / 'adapter.gguf'}" in result.stdout
    with llama_cpp(offline, adapter=tmp_path / "adapter.gguf") as server:
        assert ANSWER in chat_in(server, QUESTION)
        assert "Paris" in chat_in(server, "What is the capital of France?")
        with_lora = top_logprobs(server, base.tokenizer, QUESTION)
    with llama_cpp(merged_gguf) as server:
        merged_f16 = top_logprobs(server, base.tokenizer, QUESTION)
    shared = set(with_lora) & set(merged_f16)
    assert next(iter(with_lora)) == next(iter(merged_f16)) and len(shared) >= 3
    assert max(abs(with_lora[i] - merged_f16[i]) for i in shared) < 0.5  # Q4_K_M base against F16 weights: up to 0.33 on 33 prompts (README)
    with llama_cpp(offline) as server:
        assert "Pimbo" not in chat_in(server, QUESTION)
