"""GGUF files, the format llama.cpp, Ollama and LM Studio read, written from a transformers Qwen2/Qwen3 model:
the whole model with the tokenizer and the chat template (write_gguf: the base with the adapter merged in, or
the base alone), or the LoRA adapter by itself (write_lora_gguf), which llama.cpp applies to its base with
--lora and Ollama with ADAPTER; and the Ollama Modelfile for either.

The keys and tensor names are the ones llama.cpp's own converters (convert_hf_to_gguf.py,
convert_lora_to_gguf.py) write for these architectures; the `gguf` package (made by llama.cpp) has their
names, the writer and the Q8_0 and Q4_0 number types.
"""
import os
import re
import tempfile
from contextlib import contextmanager

import numpy as np

SUPPORTED = {"qwen2": "QWEN2", "qwen3": "QWEN3"}  # transformers model_type -> gguf MODEL_ARCH
OUT_TYPES = ("f16", "q8_0", "q4_0")  # q4_0: 32 weights in 4 bits with one F16 scale, 0.56 bytes a weight


def architecture(config):
    """The gguf MODEL_ARCH of a transformers config, or ValueError for one it cannot write."""
    import gguf
    if config.model_type not in SUPPORTED:
        raise ValueError(f"cannot write a GGUF of a {config.model_type!r} model; it can write "
                         f"{', '.join(SUPPORTED)} (Qwen1.5/2/2.5 and Qwen3)")
    return gguf.MODEL_ARCH[SUPPORTED[config.model_type]]


@contextmanager
def gguf_writer(path, arch):
    """A GGUFWriter whose file takes the name `path` only once it is written in full: a failure (a full
    disk, Ctrl-C, a tensor without a name) leaves nothing behind."""
    import gguf
    writer = gguf.GGUFWriter(path + ".tmp", gguf.MODEL_ARCH_NAMES[arch])
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise
    os.replace(path + ".tmp", path)


def write_gguf(model, tokenizer, path, name, out_type="f16", finetune="qwen-lora"):
    """Write `model` and `tokenizer` to `path`, F16, Q8_0 or Q4_0 (1-D tensors, norms and biases, stay F32
    as llama.cpp keeps them). `finetune` names what was merged in (None: the base model alone)."""
    import gguf
    from tqdm import tqdm
    config = model.config
    arch = architecture(config)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type]
    tensors = model.state_dict()
    if config.tie_word_embeddings:  # llama.cpp reads the output head from token_embd then
        tensors.pop("lm_head.weight", None)
    with gguf_writer(path, arch) as writer:
        add_metadata(writer, config, name, file_type, sum(t.numel() for t in tensors.values()), finetune)
        add_tokenizer(writer, tokenizer, config.vocab_size)
        names = gguf.TensorNameMap(arch, config.num_hidden_layers)
        for hf_name, tensor in tqdm(tensors.items(), desc=f"[gguf] {out_type} tensors"):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name}")
            data = tensor.detach().float().cpu().numpy()
            if data.ndim == 1:
                writer.add_tensor(gguf_name, data)
            elif out_type == "f16":
                writer.add_tensor(gguf_name, data.astype(np.float16))
            else:
                qtype = gguf.GGMLQuantizationType[out_type.upper()]
                writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_lora_gguf(lora_tensors, config, alpha, path):
    """The adapter alone, as llama.cpp's convert_lora_to_gguf.py writes it, for the model of the
    transformers `config`: general.type "adapter", the base's architecture, adapter.type "lora",
    adapter.lora.alpha, and for every adapted weight W (by its GGUF name, blk.N.attn_q.weight ...) the
    pair W.lora_a = PEFT's lora_A (r x in) and W.lora_b = lora_B (out x r), F32; llama.cpp then
    computes W x + (alpha / r) B (A x). `lora_tensors`: PEFT's key names (base_model.model.<module>.
    lora_A.weight ...) -> tensors. Each pair must fit a weight of the model, as llama.cpp checks."""
    import gguf
    arch = architecture(config)
    names, shapes = gguf.TensorNameMap(arch, config.num_hidden_layers), weight_shapes(config)
    with gguf_writer(path, arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key in sorted(k for k in lora_tensors if k.endswith(".lora_A.weight")):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_a, lora_b = lora_tensors[key], lora_tensors[key.replace(".lora_A.", ".lora_B.")]
            name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            expected = shapes.get(module.rsplit(".", 1)[-1]) if name else None
            if expected != (lora_b.shape[0], lora_a.shape[1]):
                found = f"{expected[0]} x {expected[1]}" if expected else "not in it"
                raise ValueError(f"the adapter's {module} is {lora_b.shape[0]} x {lora_a.shape[1]}, in this "
                                 f"{config.model_type} model {found}: was it trained on another model? Train "
                                 f"again with `python train.py`")
            writer.add_tensor(name + ".lora_a", lora_a.float().numpy())
            writer.add_tensor(name + ".lora_b", lora_b.float().numpy())


def weight_shapes(config):
    """(out, in) of each linear layer of a Qwen2/Qwen3 decoder layer, by its name."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
            "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
            "gate_proj": (config.intermediate_size, hidden), "up_proj": (config.intermediate_size, hidden),
            "down_proj": (hidden, config.intermediate_size)}


def add_metadata(writer, config, name, file_type, n_params, finetune):
    import gguf
    _, _, basename, finetune_of_name, _, size_label = gguf.Metadata.get_model_id_components(name, n_params)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"{name} + {finetune} adapter" if finetune else name)
    writer.add_basename(basename or name)
    if finetune or finetune_of_name:
        writer.add_finetune(finetune_of_name or finetune)
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


def modelfile(model, tokenizer, adapter=None):
    """An Ollama Modelfile for a GGUF `model` (and a GGUF `adapter` on top of it): Qwen's ChatML in
    Ollama's template language, the default system prompt that the chat template adds (if any), and
    <|im_end|> as the stop token. Paths as Ollama reads them: relative to the Modelfile, or absolute."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False,
                                         add_generation_prompt=True)
    default = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    system = f'SYSTEM """{default.group(1)}"""\n' if default else ""
    return (f"FROM {model}\n" + (f"ADAPTER {adapter}\n" if adapter else "") +
            'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
            '{{ range .Messages }}{{ if ne .Role "system" }}'
            '<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
            '{{ end }}{{ end }}<|im_start|>assistant\n"""\n'
            f"{system}"
            'PARAMETER stop "<|im_end|>"\n'
            "PARAMETER temperature 0\n")
