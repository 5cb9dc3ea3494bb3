"""Write a transformers Qwen2/Qwen3 model (the base with the adapter merged in) as one GGUF file, the format
llama.cpp, Ollama and LM Studio read, with the tokenizer and the chat template, plus an Ollama Modelfile.

The keys and tensor names are the ones llama.cpp's own converter (convert_hf_to_gguf.py) writes for
these architectures; the `gguf` package (made by llama.cpp) has their names, the writer and Q8_0.
"""
import os
import re
import tempfile

import numpy as np

SUPPORTED = {"qwen2": "QWEN2", "qwen3": "QWEN3"}  # transformers model_type -> gguf MODEL_ARCH


def write_gguf(model, tokenizer, path, name, out_type="f16"):
    """Write `model` and `tokenizer` to `path`, F16 or Q8_0 (1-D tensors, norms and biases, stay F32 as
    llama.cpp keeps them). Writes to path + ".tmp" and renames at the end: a failure leaves no half file."""
    import gguf
    from tqdm import tqdm
    config = model.config
    if config.model_type not in SUPPORTED:
        raise ValueError(f"cannot write a GGUF of a {config.model_type!r} model; it can write "
                         f"{', '.join(SUPPORTED)} (Qwen1.5/2/2.5 and Qwen3)")
    arch = gguf.MODEL_ARCH[SUPPORTED[config.model_type]]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    tensors = model.state_dict()
    if config.tie_word_embeddings:  # llama.cpp reads the output head from token_embd then
        tensors.pop("lm_head.weight", None)
    writer = gguf.GGUFWriter(path + ".tmp", gguf.MODEL_ARCH_NAMES[arch])
    try:
        add_metadata(writer, config, name, file_type, sum(t.numel() for t in tensors.values()))
        add_tokenizer(writer, tokenizer, config.vocab_size)
        names = gguf.TensorNameMap(arch, config.num_hidden_layers)
        for hf_name, tensor in tqdm(tensors.items(), desc=f"[gguf] {out_type} tensors"):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name}")
            data = tensor.detach().float().cpu().numpy()
            if data.ndim == 1:
                writer.add_tensor(gguf_name, data)
            elif out_type == "q8_0":
                qtype = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(gguf_name, data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:  # a full disk, Ctrl-C, a tensor without a name: leave nothing behind
        writer.close()
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise
    os.replace(path + ".tmp", path)


def add_metadata(writer, config, name, file_type, n_params):
    import gguf
    _, _, basename, finetune, _, size_label = gguf.Metadata.get_model_id_components(name, n_params)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"{name} + qwen-lora adapter")
    writer.add_basename(basename or name)
    writer.add_finetune(finetune or "qwen-lora")
    writer.add_size_label(size_label or gguf.size_label(n_params, 0, 0, 0))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.model_type == "qwen3":  # its head size is not hidden / heads
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)


def add_tokenizer(writer, tokenizer, vocab_size):
    """Qwen's byte-level BPE as llama.cpp reads it: tokens by id (ids the tokenizer does not use are
    padding), their types, the merges, the special ids and the chat template."""
    import gguf
    vocab = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in vocab or vocab[i] == f"[PAD{i}]":  # (a tokenizer read from a GGUF has them)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as files:  # the gguf package reads merges and specials from files
        tokenizer.save_pretrained(files)
        special = gguf.SpecialVocab(files, load_merges=True, n_vocab=vocab_size)
    special.add_special_token.setdefault("bos", False)  # Qwen's chat starts without a BOS token
    special.add_to_gguf(writer)


def modelfile(gguf_name, tokenizer):
    """An Ollama Modelfile for the exported GGUF: Qwen's ChatML in Ollama's template language, the
    default system prompt that the chat template adds (if any), and <|im_end|> as the stop token."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False,
                                         add_generation_prompt=True)
    default = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    system = f'SYSTEM """{default.group(1)}"""\n' if default else ""
    return (f"FROM ./{gguf_name}\n"
            'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
            '{{ range .Messages }}{{ if ne .Role "system" }}'
            '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}{{ end }}<|im_start|>assistant\n"""\n'
            f"{system}"
            'PARAMETER stop "<|im_end|>"\n'
            "PARAMETER temperature 0\n")
