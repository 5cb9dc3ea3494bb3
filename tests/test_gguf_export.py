"""--export FILE.gguf on small models: llama.cpp (through xllamacpp) loads what is written and computes the
same next-token distribution as transformers; what it cannot write, or where, is one line. The real model's
export is checked in test_end_to_end.py."""
import os

import pytest
import torch

import chat_model
import train
from conftest import llama_cpp, project, run, tiny_model
from gguf_export import write_gguf


@pytest.mark.parametrize("kind, gguf_type, tolerance", [("qwen2", "f16", 2e-3), ("qwen3", "f16", 2e-3),
                                                         ("qwen2", "q8_0", 2e-2)])
def test_llama_cpp_computes_what_transformers_does(kind, gguf_type, tolerance, qwen_tokenizer, tmp_path):
    model = tiny_model(kind, vocab_size=len(qwen_tokenizer), tie=kind == "qwen3")
    path = str(tmp_path / "tiny.gguf")
    write_gguf(model, qwen_tokenizer, path, "tiny", gguf_type)
    assert os.listdir(tmp_path) == ["tiny.gguf"]
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                              add_generation_prompt=True)
    with llama_cpp(path) as server:
        reply = server.handle_completions({"prompt": text, "max_tokens": 1, "temperature": 0, "n_probs": 5})
    top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert reply["usage"]["prompt_tokens"] == len(chat_model.prompt_ids(qwen_tokenizer, "Q?"))  # same tokens
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([chat_model.prompt_ids(qwen_tokenizer, "Q?")])).logits[0, -1], -1)
    # the five most likely tokens by llama.cpp, with (about) the probabilities transformers gives them
    assert max(abs(t["logprob"] - logprobs[t["id"]].item()) for t in top) < tolerance
    assert logprobs[top[0]["id"]] >= logprobs.max() - tolerance


def test_an_architecture_it_cannot_write_is_one_line_and_no_file(qwen_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    lm = chat_model.LM(model, qwen_tokenizer, eot_id=1, pad_id=0, path="llama")
    with pytest.raises(train.UserError, match=r"--export .*m.gguf: cannot write a GGUF of a 'llama' model; it "
                                              r"can write qwen2, qwen3 \(Qwen1.5/2/2.5 and Qwen3\)"):
        train.export(lm, str(tmp_path / "m.gguf"), "f16")
    assert os.listdir(tmp_path) == []


def test_an_unwritable_place_is_one_line_before_the_model_loads(tmp_path, tiny_model_dir):
    work = project(tmp_path / "p", tiny_model_dir)
    result = run(work, "--export", str(tmp_path / "missing" / "m.gguf"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: --export {tmp_path}/missing/m.gguf: cannot write into {tmp_path}/missing "
                             f"(missing or not writable); choose another place\n")


def test_export_before_training_says_train_first(tmp_path, tiny_model_dir):
    work = project(tmp_path / "p", tiny_model_dir, earlier_adapter=False)
    result = run(work, "--export", str(tmp_path / "m.gguf"))
    assert result.returncode == 2 and not (tmp_path / "m.gguf").exists()
    assert result.stderr == "error: no trained adapter in output/best_adapter: run `python train.py` first\n"
