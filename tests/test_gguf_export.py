"""--export FILE.gguf and --export-adapter FILE.gguf on small models: llama.cpp (through xllamacpp) loads what
is written (the merged model; the base with the adapter on it) and computes the same next-token distribution
as transformers; the adapter file holds exactly llama.cpp's keys and tensors; what it cannot write, or where,
is one line. The real model's exports are checked in test_end_to_end.py."""
import os

import pytest
import torch
from safetensors.torch import load_file

import chat_model
import train
from conftest import llama_cpp, project, run_here, tiny_model
from gguf_export import write_gguf, write_lora_gguf
from inject import inject_lora, lora_modules, merged, save_adapter


@pytest.mark.parametrize("kind, gguf_type, tolerance", [("qwen2", "f16", 2e-3), ("qwen3", "f16", 2e-3),
                                                         ("qwen2", "q8_0", 2e-2), ("qwen2", "q4_0", 0.2)])
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


def test_an_unwritable_place_is_one_line_before_the_model_loads(tmp_path, capfd, tiny_model_dir):
    work = project(tmp_path / "p", tiny_model_dir)
    result = run_here(capfd, work, "--export", str(tmp_path / "missing" / "m.gguf"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: --export {tmp_path}/missing/m.gguf: cannot write into {tmp_path}/missing "
                             f"(missing or not writable); choose another place\n")


def test_export_before_training_says_train_first(tmp_path, capfd, tiny_model_dir):
    work = project(tmp_path / "p", tiny_model_dir, earlier_adapter=False)
    result = run_here(capfd, work, "--export", str(tmp_path / "m.gguf"))
    assert result.returncode == 2 and not (tmp_path / "m.gguf").exists()
    assert result.stderr == "error: no trained adapter in output/best_adapter: run `python train.py` first\n"


def lora_model(qwen_tokenizer, tmp_path):
    """A tiny Qwen2 with LoRA on q/v of layers 2-3, B set as if trained, saved as the tool saves adapters,
    and its base written as base.gguf."""
    base = tiny_model("qwen2", vocab_size=len(qwen_tokenizer), tie=False)
    write_gguf(base, qwen_tokenizer, str(tmp_path / "base.gguf"), "tiny", "f16", finetune=None)
    model = tiny_model("qwen2", vocab_size=len(qwen_tokenizer), tie=False)  # the same weights
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.3)
    save_adapter(model, tmp_path / "adapter", "tiny")
    return model


def test_the_adapter_gguf_holds_llama_cpps_keys_and_one_pair_a_then_b_per_adapted_weight(qwen_tokenizer, tmp_path):
    import gguf
    model = lora_model(qwen_tokenizer, tmp_path)
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    write_lora_gguf(tensors, model.config, 8, str(tmp_path / "adapter.gguf"))
    reader = gguf.GGUFReader(tmp_path / "adapter.gguf")
    fields = {k: reader.fields[k].contents() for k in reader.fields if not k.startswith("GGUF.")}
    assert fields == {"general.architecture": "qwen2", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 8.0}
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    expected = []
    for layer in (2, 3):
        for gguf_name, hf_name in (("attn_q", "q_proj"), ("attn_v", "v_proj")):
            m = lora_modules(model)[f"model.layers.{layer}.self_attn.{hf_name}"]
            expected += [(f"blk.{layer}.{gguf_name}.weight.lora_a", m.lora_A), (f"blk.{layer}.{gguf_name}.weight.lora_b", m.lora_B)]
    assert [t.name for t in reader.tensors] == [name for name, _ in expected]  # each pair complete, lora_a first
    for t, (_, weight) in zip(reader.tensors, expected):  # PEFT's shapes: A is (r, in), B is (out, r)
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert torch.equal(torch.from_numpy(t.data.copy()).reshape(weight.shape), weight.detach())


def test_llama_cpp_with_the_adapter_on_the_base_computes_the_merged_model(qwen_tokenizer, tmp_path):
    model = lora_model(qwen_tokenizer, tmp_path)
    base = tiny_model("qwen2", vocab_size=len(qwen_tokenizer), tie=False)  # the same weights, no adapter
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    write_lora_gguf(tensors, model.config, 8, str(tmp_path / "adapter.gguf"))
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False,
                                              add_generation_prompt=True)
    ids = torch.tensor([chat_model.prompt_ids(qwen_tokenizer, "Q?")])
    with torch.no_grad(), merged(model):
        logprobs = torch.log_softmax(model(ids).logits[0, -1], -1)
        plain = torch.log_softmax(base(ids).logits[0, -1], -1)
    assert (logprobs - plain).abs().max() > 0.1  # the adapter changes the answer's distribution
    with llama_cpp(tmp_path / "base.gguf", adapter=tmp_path / "adapter.gguf") as server:
        reply = server.handle_completions({"prompt": text, "max_tokens": 1, "temperature": 0, "n_probs": 5})
    top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert max(abs(t["logprob"] - logprobs[t["id"]].item()) for t in top) < 2e-3  # F16 base, F32 adapter


def test_an_adapter_of_another_model_or_architecture_is_refused_with_nothing_written(qwen_tokenizer, tmp_path):
    from transformers import LlamaConfig
    model = lora_model(qwen_tokenizer, tmp_path)
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"
    with pytest.raises(ValueError, match=r"model.layers.3.self_attn.v_proj is 17 x 32, in this qwen2 model 16 x 32: "
                                         r"was it trained on another model"):
        write_lora_gguf({**tensors, key: torch.zeros(17, 4)}, model.config, 8, str(tmp_path / "a.gguf"))
    deeper = {k.replace("layers.3.", "layers.7."): t for k, t in tensors.items()}  # a layer the model has not
    with pytest.raises(ValueError, match=r"model.layers.7.self_attn.q_proj is 32 x 32, in this qwen2 model not in it"):
        write_lora_gguf(deeper, model.config, 8, str(tmp_path / "a.gguf"))
    llama = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="cannot write a GGUF of a 'llama' model; it can write qwen2, qwen3"):
        write_lora_gguf(tensors, llama, 8, str(tmp_path / "a.gguf"))
    assert sorted(os.listdir(tmp_path)) == ["adapter", "base.gguf"]


def test_the_adapter_export_before_training_or_to_an_unwritable_place_is_one_line(tmp_path, capfd, tiny_model_dir):
    work = project(tmp_path / "p", tiny_model_dir, earlier_adapter=False)
    result = run_here(capfd, work, "--export-adapter", str(tmp_path / "a.gguf"))
    assert result.returncode == 2 and not (tmp_path / "a.gguf").exists()
    assert result.stderr == "error: no trained adapter in output/best_adapter: run `python train.py` first\n"
    result = run_here(capfd, work, "--export-adapter", str(tmp_path / "missing" / "a.gguf"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: --export-adapter {tmp_path}/missing/a.gguf: cannot write into "
                             f"{tmp_path}/missing (missing or not writable); choose another place\n")
