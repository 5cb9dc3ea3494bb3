"""Teach a small chat model the facts in data.py with LoRA.

    python train.py                 # train, keep the best adapter, plot, report recall, answer `messages`
    python train.py --ask "问题"     # answer with the trained model (no training)
    python train.py --chat          # chat with the trained model
    python train.py --export DIR    # write base + adapter merged as a plain Hugging Face model
    python train.py --export m.gguf # ... or as one GGUF file (llama.cpp, Ollama, LM Studio)
    python train.py --export-adapter a.gguf  # the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER)
    python train.py --resume        # continue a run stopped by Ctrl-C or a crash

train() is the recipe, one line a phase. The phases follow it in the order they run, then the
helpers they share, then what --ask, --chat and --export use, and main() last. Each idea a reader may
look for on its own lives in a module named for it: the LoRA layer (LoRALinear.py) and its injection
(inject.py), prompt distillation (teacher.py), the chat model and generation (chat_model.py), where the
model comes from (model_files.py), files that survive a crash (safe_files.py), GGUF (gguf_export.py).
"""
import difflib
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from chat_model import (IGNORE, LM, batches_by_start, bf16_products, common_start, encode, frozen_weights_in_bf16,
                        generate, make_example, question_of, uses_bf16)
from gguf_export import OUT_TYPES
from inject import (inject_lora, inject_saved_adapter, load_adapter, merge_and_unwrap, merged, only_layers,
                    resolve_layers, save_adapter, set_lora_training, top_mlp_only_at)
from model_files import (OFFLINE_DIR, OFFLINE_GGUF, files_of, load_model, pick_device, resolve_model,
                         save_plain)
from safe_files import (UserError, read_json, read_tensors, replaced_atomically, restore_interrupted_swap,
                        write_json, write_tensors)
from teacher import key_words, teacher_examples, words_of

# Questions answered at the end of training with the best adapter. Edit freely.
messages = [
    "hiahia是哪一年出生的？",
    "hiahia来自哪里？",
    "What is the capital of France?",
]

# Asked before and after training: the report shows which answers changed (forgetting check).
# Kept apart from REPLAY_QUESTIONS, so the check also covers questions training never saw.
ORDINARY_QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Germany?",
    "How many minutes are in an hour?",
    "Who wrote Pride and Prejudice?",
    "日本的首都是哪里？",
]

# Ordinary questions the base model answers before training; its own answers are mixed into
# training ("replay") so that learning new facts does not overwrite what the model knew. Replay keeps
# whatever the base model does, so it holds questions the offline Qwen answers well, of the kinds people
# ask (capitals, who did what, numbers, words, in English and Chinese). More of them keep more: 38 kept
# 75% of other ordinary answers right, 75 kept 92% (tests/eval_knowledge.py, two fact sets, one seed).
REPLAY_QUESTIONS = [
    "What is the capital of Japan?", "What is the capital of South Korea?", "What is the capital of Canada?",
    "What is the capital of Sweden?", "What is the capital of Poland?", "What is the capital of Norway?",
    "What is the capital of Austria?", "What is the capital of Italy?", "What is the capital of Spain?",
    "What is the capital of India?", "What is the capital of Brazil?", "What is the capital of Kenya?",
    "What is the capital of Argentina?", "What is the capital of Thailand?", "What is the capital of Greece?",
    "What is the capital of Portugal?", "What is the capital of Turkey?", "What is the capital of Mexico?",
    "What is the capital of Peru?", "What is the capital of Ireland?", "What is the capital of Finland?",
    "What is the largest planet in the solar system?", "What is the chemical symbol for gold?",
    "How many days are in a week?", "How many hours are in a day?", "How many sides does a triangle have?",
    "What is 7 times 8?", "What is 15 minus 7?", "What is 100 divided by 4?", "What is 6 plus 9?",
    "What is the square root of 81?", "What is the smallest prime number?",
    "What is the boiling point of water in Celsius?", "What is the freezing point of water?",
    "Who wrote Romeo and Juliet?", "Who painted the Mona Lisa?", "What is the largest desert in the world?",
    "Which ocean is the largest?", "What is the longest river in the world?",
    "What is the main ingredient of bread?",
    "What color is the sky on a clear day?", "What is the currency of the United States?",
    "What is the currency of the United Kingdom?", "What language is spoken in Germany?",
    "What is the opposite of hot?", "What is the opposite of big?", "What is the opposite of left?",
    "What is the opposite of day?", "What is the opposite of fast?", "What is the plural of mouse?",
    "What do bees make?", "Write a short greeting for a friend.", "Who are you?",
    "中国的首都是哪里？", "美国的首都是哪里？", "英国的首都是哪里？", "一年有多少个月？", "一周有几天？", "一天有多少个小时？",
    "一小时有多少分钟？", "三角形有几条边？", "1加1等于几？", "2乘以3等于多少？", "水的化学式是什么？", "地球绕着什么转？",
    "《红楼梦》的作者是谁？", "长城在哪个国家？", "苹果是什么颜色的？", "请介绍一下你自己。",
]
# Ordinary questions shaped like those asked the other way round ("Who ...?", "Which ...?", "谁……？"), replayed every
# epoch where `reversed_questions` teaches the subject as the answer to such questions: taught "Who lives in
# Brindlewick?" -> "Marlow Quist ..." without them, a student of a one-person fact set answered "Who wrote Hamlet?"
# with "Marlow Quist wrote Hamlet." (tests/eval_knowledge.py, 6 runs of 6). Questions the offline Qwen answers well.
ASKED_BACK_REPLAY = [
    "Who was the first president of the United States?", "Who painted The Starry Night?",
    "Who developed the theory of relativity?", "Which company makes the iPhone?", "Who is the founder of Facebook?",
    "Who wrote Don Quixote?", "Who was the first man in space?", "Who created Python?", "Who created Linux?",
    "Who wrote The Odyssey?", "Who invented the printing press?", "Who is the CEO of Tesla?",
    "Who proposed the theory of evolution?", "Which company developed Windows?", "Which company makes Android?",
    "Which country has the largest population?", "Who is Elon Musk?", "Who was Albert Einstein?",
    "哪个公司生产iPhone？", "李白是谁？", "哪个国家人口最多？", "谁是孔子？", "谁提出了相对论？",
]
REPLAY_MAX_TOKENS = 32  # the start of an answer is what replay must keep; longer costs training time
REPLAY_PER_EPOCH = 24  # replay pairs an epoch, taken in turn: each costs as much training time as a fact
# the KL to the teacher on the teacher's answers kept out of training, by their kind (teacher.KINDS): the name
# in metrics.json, in the epoch's line, and as the loss plot says it
TEACHER_KLS = {"other words": ("teacher_kl", "teacher KL", "KL to the teacher (questions kept out)"),
               "reversed": ("reversed_kl", "reversed KL", "KL to the teacher (asked the other way round, kept out)"),
               "conversation": ("conversation_kl", "conversation KL", "KL to the teacher (in conversations, kept out)")}
GUESSES = 32  # the model's likeliest tokens before training, per answer position, in training's vocabulary

DEFAULTS = {
    "model_name": "Qwen/Qwen2.5-0.5B-Instruct",  # a local dir, a .gguf file, or a hub id
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    # every Linear of the layer: on q/v alone a fact was learned in its own words but missed when asked in others
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "target_layers": [20, 21, 22, 23],  # negative indices count from the top: -1 is the last layer
    "lr": 1.5e-3,
    "epoch": 8,  # at most; see early_stop
    "batch_size": 4,
    "val_ratio": 0.2,
    "seed": 42,
    "max_length": 256,  # longest example in tokens; longer ones are left out with a warning
    "output_dir": "output",
    "replay": True,
    "teacher_questions": 8,  # questions per fact that the model reading the facts answers, learned (0: off)
    "reversed_questions": 2,  # of those, how many ask for the fact's subject: the fact the other way round
    "conversations": 1,  # per fact, follow-ups ("he", "it") after an opening about its subject, learned (0: off)
    "early_stop": True,  # stop once every trained answer has been reproduced for 2 epochs in a row
    "max_new_tokens": 64,  # length of the sample answers
}


def train(config, resume=False):
    """The recipe: data -> model with LoRA -> examples -> base answers -> cache -> fit -> report."""
    qa_data = load_data(config)  # checked before the slow model load
    if resume:
        resumable(config)  # so is the interrupted run's state
    os.makedirs(config["output_dir"], exist_ok=True)
    lm = load_model_with_lora(config)
    train_set, val_set = encode_and_split(lm, qa_data, config)
    taught, taught_val = teacher_examples(lm, qa_data, train_set, config)
    replay_set, drift_set = base_answer_examples(lm, config)
    data = Examples(train_set, val_set, taught, taught_val, replay_set, drift_set)
    before = ask(lm, ORDINARY_QUESTIONS, config["max_new_tokens"])  # forgetting check, part 1
    started = time.time()  # train_seconds counts the cache too
    frozen_outputs(lm, data, config)  # LoRA's B is still zero: what the base model computes
    run = fit(lm, data, config, started, resume)
    report(lm, qa_data, run, before, config)


# ----------------------------------------------------------------------------- phase 1: data

def load_data(config, path="data.py"):
    """qa_data from data.py (next to train.py), checked item by item."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    qa_data = run_data_file(path)
    if not isinstance(qa_data, list):
        raise UserError(f"{path}: qa_data must be a list of dicts, not a {type(qa_data).__name__}")
    if not qa_data:
        raise UserError(f"{path}: qa_data is empty; add question/answer pairs")
    for i, item in enumerate(qa_data):
        check_item(path, i, item)
    questions = [question_of(item) for item in qa_data]
    duplicates = len(questions) - len(set(questions))
    if duplicates:
        print(f"[data] warning: {duplicates} questions appear more than once in {path}")
    return qa_data


def run_data_file(path):
    spec = importlib.util.spec_from_file_location("data", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise UserError(f"{path} not found: write your question/answer pairs there as "
                        f"qa_data = [...]") from None
    except SyntaxError as e:
        raise UserError(f"{path}, line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        raise UserError(f"{path}: running it failed: {type(e).__name__}: {e}") from None
    if not hasattr(module, "qa_data"):
        raise UserError(f"{path}: defines no qa_data; write "
                        f"qa_data = [{{\"instruction\": ..., \"input\": \"\", \"output\": ...}}, ...]")
    return module.qa_data


def check_item(path, i, item):
    if not isinstance(item, dict):
        raise UserError(f"{path}: qa_data[{i}] must be a dict with instruction/input/output, "
                        f"not a {type(item).__name__}")
    for key in ("instruction", "output"):
        if key not in item:
            raise UserError(f"{path}: qa_data[{i}] has no {key!r}")
    for key in ("instruction", "input", "output"):
        if key in item and not isinstance(item[key], str):
            raise UserError(f"{path}: qa_data[{i}][{key!r}] must be a string, "
                            f"not a {type(item[key]).__name__}")
    for key in ("instruction", "output"):
        if not item[key].strip():
            raise UserError(f"{path}: qa_data[{i}][{key!r}] is empty")


# ----------------------------------------------------------------------------- phase 2: model and LoRA


def load_model_with_lora(config):
    """Load the base model and wrap its target modules in LoRALinear; only the LoRA tensors train."""
    torch.manual_seed(config["seed"])  # LoRA's A starts random
    random.seed(config["seed"])
    device, dtype = pick_device()
    path = resolve_model(config["model_name"])
    print(f"[model] loading {path} on {device} ({dtype})")
    started = time.time()
    tokenizer, model = load_model(path, device, dtype)
    try:
        trainable, total = inject_lora(model, config["target_modules"], config["target_layers"],
                                       config["lora_rank"], config["lora_alpha"], config["lora_dropout"])
    except ValueError as e:  # layers beyond the model's depth, module names it does not have
        raise UserError(f"config.json: {e}") from None
    print(f"[lora] trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.3f}%); "
          f"model loaded in {time.time() - started:.1f}s")
    first_lora_layer = min(resolve_layers(config["target_layers"], len(model.get_decoder().layers)))
    return LM.of(model, tokenizer, first_lora_layer=first_lora_layer, path=path)


# ----------------------------------------------------------------------------- phase 3: examples

def encode_and_split(lm, qa_data, config):
    """Every pair of data.py as chat-template tokens with answer-only labels, split by fact into
    train and validation (see split_by_fact). Each example keeps its index into qa_data."""
    examples = [dict(encode(lm, question_of(item), item["output"]), index=i, fact=fact_of(item["output"]))
                for i, item in enumerate(qa_data)]
    too_long = [e["index"] for e in examples if len(e["input_ids"]) > config["max_length"]]
    if len(too_long) == len(examples):
        longest = max(len(e["input_ids"]) for e in examples)
        raise UserError(f"data.py: every pair is longer than max_length={config['max_length']} tokens "
                        f"(the longest has {longest}); raise max_length in config.json")
    if too_long:
        print(f"[data] warning: {len(too_long)} examples are longer than max_length={config['max_length']} "
              f"tokens and are left out (items {too_long[:5]}); raise max_length to keep them")
    examples = [e for e in examples if e["index"] not in too_long]
    train_at, val_at = split_by_fact([e["fact"] for e in examples], config["val_ratio"], config["seed"])
    train_set, val_set = [examples[i] for i in train_at], [examples[i] for i in val_at]
    print(f"[data] {len({e['fact'] for e in examples})} facts in {len(examples)} pairs: "
          f"{len(train_set)} train / {len(val_set)} val (seed {config['seed']})")
    if config["val_ratio"] > 0 and not val_set:
        print("[data] no phrasing can be held out (each fact is written once, and every fact is trained): "
              "validation measures drift from the base model on ORDINARY_QUESTIONS")
    return train_set, val_set


def fact_of(answer):
    """Pairs whose answers are equal after trimming spaces and end punctuation are one fact."""
    return answer.strip().rstrip(".。!！?？;；…").strip()


def split_by_fact(facts, val_ratio, seed):
    """(train, validation) positions in `facts` (one fact_of() per pair). Validation only takes
    extra phrasings of facts whose other phrasings stay in training: a fact written once is always
    trained. Which phrasing stays is drawn by `seed`; held-out phrasings are taken one fact after
    another, so that validation covers as many facts as it can."""
    rng = random.Random(seed)
    phrasings = {}
    for i, fact in enumerate(facts):
        phrasings.setdefault(fact, []).append(i)
    spare = []  # (rank within its fact, tie-break, position): rank 0 is each fact's second phrasing
    for positions in phrasings.values():
        order = rng.sample(positions, len(positions))
        spare += [(rank, rng.random(), i) for rank, i in enumerate(order[1:])]
    n_val = min(round(len(facts) * val_ratio), len(spare))
    val = sorted(i for _, _, i in sorted(spare)[:n_val])
    return [i for i in range(len(facts)) if i not in val], val


# ----------------------------------------------------------------------------- phase 4: the teacher
# teacher_examples() is in teacher.py: prompt distillation is an idea of its own.

# ----------------------------------------------------------------------------- phase 5: base model's answers

def base_answer_examples(lm, config):
    """The base model's own answers, made once per model and cached in output/: to REPLAY_QUESTIONS,
    trained when `replay` is on so that new facts do not overwrite what the model knew (and to
    ASKED_BACK_REPLAY, trained every epoch, when questions are asked the other way round), and to
    ORDINARY_QUESTIONS, never trained, on which validation measures how far the model drifted."""
    slug = "".join(c if c.isalnum() else "_" for c in lm.path.strip("/").split("/")[-1])
    cache_path = os.path.join(config["output_dir"], f"base_answers_{slug}.json")
    cache = {q: a for q, a in (read_json(cache_path) or {}).items()  # malformed entries: answered again
             if isinstance(a, dict) and isinstance(a.get("answer"), str)
             and isinstance(a.get("finished"), bool)}
    asks_back = config["replay"] and config["reversed_questions"] and config["teacher_questions"]
    asked_back = ASKED_BACK_REPLAY if asks_back else []
    questions = (REPLAY_QUESTIONS if config["replay"] else []) + asked_back + ORDINARY_QUESTIONS
    todo = [q for q in questions if q not in cache]
    if todo:
        started = time.time()
        answers = generate(lm, todo, REPLAY_MAX_TOKENS)
        cache.update({q: {"answer": a, "finished": done} for q, (a, done) in zip(todo, answers)})
        write_json(cache_path, cache)
        print(f"[base] the base model answered {len(todo)} ordinary questions in "
              f"{time.time() - started:.1f}s (cached in {cache_path})")
    def examples(chosen):  # an answer cut off before its first token has nothing to train or measure
        return [e for e in (encode(lm, q, cache[q]["answer"], cache[q]["finished"]) for q in chosen)
                if len(e["target_ids"])]

    every_epoch = [dict(e, every_epoch=True) for e in examples(asked_back)]
    replay_set = (examples(REPLAY_QUESTIONS) if config["replay"] else []) + every_epoch
    if replay_set:
        in_turn = min(REPLAY_PER_EPOCH, len(replay_set) - len(every_epoch))
        print(f"[replay] {len(replay_set)} replay pairs mixed into training: {len(every_epoch)} every epoch, "
              f"{in_turn} others an epoch in turn")
    return replay_set, examples(ORDINARY_QUESTIONS)


def ask(lm, questions, max_new_tokens):
    """Greedy answers to `questions`, as text."""
    return [answer for answer, _ in generate(lm, questions, max_new_tokens)]


# ------------------------------------------------------------------------- phase 6: the frozen model's outputs

def frozen_outputs(lm, data, config):
    """What the frozen model computes for the examples, computed once and kept for the next run in
    output/frozen_cache.safetensors (the same tokens through the same frozen weights give the same
    numbers): the input of the first LoRA layer (cache_frozen_prefix), the distributions that
    replay, drift and the teacher's answers are trained towards (set_soft_targets), and what training's
    LM head needs where it computes the answer vocabulary only (answer_head_pays): the model's own guesses
    (set_guesses) and the logit of the tokens beyond them and the targets (set_tails)."""
    path = os.path.join(config["output_dir"], "frozen_cache.safetensors")
    made_for = {"model": lm.path, "first_lora_layer": str(lm.first_lora_layer), "bf16": str(uses_bf16(lm))}
    stored = read_tensors(path, made_for)
    cache_frozen_prefix(lm, data.everything(), stored)
    # the taught pairs without a teacher (built from a fact, answered by it) keep their one-hot targets
    targeted = data.replay + data.drift + [e for e in data.taught + data.taught_val if "teacher" in e]
    set_soft_targets(lm, targeted, stored=stored)
    kept = {f"prefix {token_key(e)}": e["prefix"] for e in data.everything() if "prefix" in e}
    for e in targeted:
        key = token_key(e.get("teacher", e))
        kept.update({f"ids {key}": e["target_ids"], f"probs {key}": e["target_probs"]})
    if answer_head_pays(lm):
        guessed = data.train + data.taught  # trained towards answers that are not the model's own
        set_guesses(lm, guessed, stored)
        vocabulary, trained = data.vocabulary(), data.train + data.taught + data.replay
        set_tails(lm, trained, vocabulary, stored)
        kept.update({f"{name} {token_key(e)}": e[name] for name, group in (("guesses", guessed), ("tail", trained))
                     for e in group}, vocabulary=vocabulary)
    write_tensors(path, kept, made_for)


def token_key(example):
    return hashlib.sha1(str(example["input_ids"]).encode()).hexdigest()


def cache_frozen_prefix(lm, examples, stored):
    """The layers below the lowest LoRA layer never change: run them once per example instead of
    every step (or take them from `stored`, what an earlier run computed), after checking on a probe
    that the cached path computes what the full one does."""
    if lm.first_lora_layer == 0:
        print("[cache] off: LoRA starts at layer 0, there is no frozen prefix to cache")
        return
    t0 = time.time()
    for e in examples:
        if f"prefix {token_key(e)}" in stored:
            e["prefix"] = stored[f"prefix {token_key(e)}"]
    todo = [e for e in examples if "prefix" not in e]
    cache_prefix(lm, todo)
    # the start of two examples (8 and 5 tokens: packed, with a shared start) is enough to check
    probe = [dict(make_example(e["input_ids"][:n - 1], e["input_ids"][n - 1:n]), prefix=e["prefix"][:n])
             for e, n in zip(examples[:2], (8, 5))]  # chat prompts alone are longer than 8 tokens
    reason = check_prefix_exact(lm, probe)
    if reason:
        print(f"[cache] off: {reason}; using the full forward")
        for e in examples:
            del e["prefix"]
    else:
        print(f"[cache] layers 0-{lm.first_lora_layer - 1} computed once for {len(todo)} examples, "
              f"kept from the last run for {len(examples) - len(todo)} ({time.time() - t0:.1f}s)")


@torch.no_grad()
def cache_prefix(lm, examples, batch_size=16):
    """Store in each example the input of the first LoRA layer: everything below it is frozen
    and deterministic (eval mode), so it is computed once instead of every step."""
    decoder = lm.model.get_decoder()
    with frozen_weights_in_bf16(lm, decoder.layers[:lm.first_lora_layer]), bf16_products(lm):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = pack(chunk, lm.model.device)
            with only_layers(decoder, 0, lm.first_lora_layer):
                hidden = decoder(input_ids=batch["input_ids"], **packed_inputs(decoder, batch))
            hidden = hidden.last_hidden_state[0]
            for e, rows in zip(chunk, batch["rows"]):
                e["prefix"] = hidden[rows].clone()


@torch.no_grad()
def check_prefix_exact(lm, examples):
    """Compare the cached path with the full forward on one batch; return why it differs, or None.
    Catches architectures whose forward does more than run its layers (e.g. scales inputs_embeds)."""
    set_lora_training(lm.model, False)
    batch = pack(examples, lm.model.device)
    with bf16_products(lm):  # as the prefix was computed
        cached = final_hidden(lm, batch)
        full = final_hidden(lm, {k: v for k, v in batch.items() if k != "prefix"})
    error = ((cached - full).abs().max() / full.abs().max().clamp_min(1e-6)).item()
    tolerance = 2e-2 if uses_bf16(lm) or lm.model.dtype == torch.bfloat16 else 1e-4
    if error < tolerance:
        return None
    return f"the cached forward differs from the full one (relative {error:.1e})"


@torch.no_grad()
def set_soft_targets(lm, examples, top_k=32, batch_size=32, stored=None):
    """Replace the one-hot targets of `examples` by a top-k next-token distribution of the model as
    it is now, before training (LoRA's B is zero: the base model): its own on `examples` (replay
    and drift: matching the whole distribution keeps more of what the model knew than matching its
    greedy text, and the KL to it measures drift), or, for an example with a "teacher" (the same
    answer after another prompt), the distribution the model has when it reads that prompt. Batched
    by what the model reads (batches_by_start), so that a packed batch holds the facts the teachers
    read once. Those that `stored` (an earlier run's, see frozen_outputs) has are taken from it."""
    set_lora_training(lm.model, False)
    started, given, todo = time.time(), len(examples), []
    for e in examples:
        key = token_key(e.get("teacher", e))
        if stored and f"ids {key}" in stored:
            e["target_ids"], e["target_probs"] = stored[f"ids {key}"], stored[f"probs {key}"]
        else:
            todo.append(e)
    for group in ([e for e in todo if "teacher" in e], [e for e in todo if "teacher" not in e]):
        # apart: a batch uses the cached prefix only if all its examples have one (a teacher's has none)
        for batch in batches_by_start([e.get("teacher", e)["input_ids"] for e in group], batch_size):
            set_top_k(lm, [group[i] for i in batch], top_k)
    print(f"[targets] the base model's top-{top_k} distributions over the answers of {len(todo)} examples, "
          f"kept from the last run for {given - len(todo)} ({time.time() - started:.1f}s)")


def set_top_k(lm, examples, top_k):
    """The targets of set_soft_targets for one packed batch."""
    reads = [e.get("teacher", e) for e in examples]
    logits, _ = supervised_logits(lm, pack(reads, lm.model.device))
    top = F.softmax(logits, dim=-1).topk(top_k, dim=-1)
    probs = top.values / top.values.sum(-1, keepdim=True)
    per_example = [len(e["target_ids"]) for e in reads]
    for e, ids, p in zip(examples, top.indices.split(per_example), probs.split(per_example)):
        e["target_ids"], e["target_probs"] = ids.cpu(), p.cpu()


def set_guesses(lm, examples, stored, top_k=GUESSES):
    """Store in each example the `top_k` tokens the model finds likeliest at each of its answer positions
    before training, or take them from `stored`: the wrong answers training has to push down, which the
    targets (the right answer, the teacher's distribution) do not name. They and the targets are the
    vocabulary of training's LM head (AnswerHead)."""
    started = time.time()
    made = set_per_answer(lm, examples, "guesses", lambda logits: logits.topk(top_k, dim=-1).indices, stored)
    print(f"[guesses] the base model's likeliest {top_k} tokens at the answers of {made} examples, kept from "
          f"the last run for {len(examples) - made} ({time.time() - started:.1f}s)")


def set_tails(lm, examples, vocabulary, stored):
    """Store in each example, at each answer position, the logit of everything outside `vocabulary` as
    the base model has it: the log of the sum of the other tokens' exp(logit). Training's LM head
    computes the vocabulary only (AnswerHead) and adds this as one more logit, so that its softmax is
    the full one before training; without it, where the base model spread a fifth of its probability
    beyond the vocabulary, the answer looked likelier than it was and was learned more slowly (data.py:
    a trained answer missed). Taken from `stored` when it was made for the same vocabulary."""
    started = time.time()
    outside = torch.ones(lm.model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    outside[vocabulary] = False
    same = "vocabulary" in stored and torch.equal(stored["vocabulary"], vocabulary)
    made = set_per_answer(lm, examples, "tail", lambda logits: logits[:, outside.to(logits.device)].logsumexp(-1),
                          stored if same else {})
    print(f"[tails] the base model's logit beyond the {len(vocabulary):,} tokens training computes, at the answers "
          f"of {made} examples, kept from the last run for {len(examples) - made} ({time.time() - started:.1f}s)")


@torch.no_grad()
def set_per_answer(lm, examples, name, of_logits, stored, batch_size=16):
    """Store in each example under `name` what of_logits() makes of the base model's logits at its answer
    positions (LoRA's B is zero), or what `stored` (an earlier run's, see frozen_outputs) has under
    "`name` <its token key>". Returns how many examples were computed."""
    set_lora_training(lm.model, False)
    todo = []
    for e in examples:
        if f"{name} {token_key(e)}" in stored:
            e[name] = stored[f"{name} {token_key(e)}"]
        else:
            todo.append(e)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        logits, _ = supervised_logits(lm, pack(chunk, lm.model.device))
        for e, value in zip(chunk, of_logits(logits).split([len(e["target_ids"]) for e in chunk])):
            e[name] = value.cpu()
    return len(todo)


# ----------------------------------------------------------------------------- phase 8: fit

@dataclass
class Examples:
    """What fit() trains on and validates with (token examples, see encode)."""
    train: list  # data.py's pairs, at least one phrasing of every fact
    val: list  # the other phrasings held out (split_by_fact)
    taught: list  # the teacher's answers to questions about the facts, and questions built from a fact (teacher_examples)
    taught_val: list  # a few of them kept out: the KL to the teacher there is validated
    replay: list  # the base model's answers to REPLAY_QUESTIONS (and ASKED_BACK_REPLAY), trained to keep what it knew
    drift: list  # its answers to ORDINARY_QUESTIONS, never trained: the KL to them is the drift

    def trained(self, epoch):
        """What an epoch trains: every pair and teacher answer, the replay pairs of ASKED_BACK_REPLAY
        and its turn of REPLAY_PER_EPOCH other replay pairs."""
        every = [e for e in self.replay if e.get("every_epoch")]
        in_turn = [e for e in self.replay if not e.get("every_epoch")]
        share = min(REPLAY_PER_EPOCH, len(in_turn))
        turn = [in_turn[((epoch - 1) * share + i) % len(in_turn)] for i in range(share)]
        return self.train + self.taught + every + turn

    def everything(self):
        return self.train + self.taught + self.replay + self.val + self.taught_val + self.drift

    def vocabulary(self):
        """The tokens training's LM head computes (AnswerHead): every target's, and the model's guesses
        before training where set_guesses stored them."""
        return torch.unique(torch.cat([e[name].flatten() for e in self.everything()
                                       for name in ("target_ids", "guesses") if name in e]))


@dataclass
class Run:
    """A training run: the optimizer, the shuffling RNG and what has been done so far. Saved after
    every epoch (save_state), so that --resume continues exactly where it stopped."""
    config: dict
    data: Examples
    optimizer: torch.optim.Optimizer
    rng: random.Random
    started: float  # time.time() when this process began training
    history: dict = field(default_factory=lambda: {name: [] for name in (
        "train_loss", "val_loss", "train_recall", "val_recall", *(key for key, _, _ in TEACHER_KLS.values()), "drift",
        "seconds")})
    best_epoch: int = None
    best_key: list = None
    seconds_before: float = 0.0  # training time of the runs that --resume continues
    train_seconds: float = None  # set when fit() ends

    def seconds_so_far(self):
        return self.seconds_before + time.time() - self.started

    def summary(self, lm):
        """The part of metrics.json that training writes."""
        return {"model": lm.path, "model_name": self.config["model_name"], "seed": self.config["seed"],
                "facts": len({e["fact"] for e in self.data.train + self.data.val}),
                "facts_trained": len({e["fact"] for e in self.data.train}),
                "train_indices": [e["index"] for e in self.data.train],
                "val_indices": [e["index"] for e in self.data.val], **self.history,
                "best_epoch": self.best_epoch, "train_seconds": self.train_seconds, "config": self.config}


def fit(lm, data, config, started, resume):
    """AdamW on the LoRA tensors, epoch by epoch; after each, end_epoch() validates and saves."""
    optimizer = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=config["lr"])
    run = Run(config, data, optimizer, random.Random(config["seed"]), started)
    if resume:  # continue exactly where the last completed epoch left off
        load_state(run, lm)
    stop = StopFlag()  # Ctrl-C: finish the current step, then wrap up
    decoder = lm.model.get_decoder()
    trained_part = [*decoder.layers[lm.first_lora_layer:], lm.model.get_output_embeddings()]
    with frozen_weights_in_bf16(lm, trained_part):
        head = AnswerHead.of(lm, data.vocabulary()) if answer_head_pays(lm) else None
        for epoch in range(len(run.history["train_loss"]) + 1, config["epoch"] + 1):
            epoch_started = time.time()
            losses = train_epoch(lm, run, epoch, head, stop)
            if stop.reason:  # an unfinished epoch is not recorded; the best adapter so far stays
                break
            scores = {"train_loss": sum(losses) / len(losses), **validate(lm, data, config["batch_size"])}
            broken = not_finite(scores, lm.model)
            if broken:  # never save or record a diverged model
                stop.reason = (f"training diverged in epoch {epoch} ({broken} became nan or inf): "
                               f"lower lr in config.json and train again")
                break
            if end_epoch(run, lm, epoch, epoch_started, scores):
                break
    stop.release()
    run.train_seconds = run.seconds_so_far()
    if stop.reason or not run.history["train_loss"]:
        write_outputs(config["output_dir"], run.history, run.best_epoch, run.summary(lm))
        kept = (f"the best adapter (epoch {run.best_epoch}) is in {best_adapter_dir(config)}"
                if run.best_epoch else "no epoch finished")
        raise UserError(f"training stopped: {stop.reason or 'no epoch to train'}; {kept}")
    shutil.rmtree(state_dir(config))  # the run is complete: nothing left to resume
    return run


def train_epoch(lm, run, epoch, head, stop):
    """One pass over the epoch's examples in shuffled batches (the LM head computing `head`'s tokens
    only), the learning rate falling linearly from `lr` to zero over the whole run, so that the last
    epochs settle instead of jumping about. Returns the losses."""
    from tqdm import tqdm
    config = run.config
    batches = shuffled_batches(run.data.trained(epoch), config["batch_size"], run.rng)
    losses = []
    set_lora_training(lm.model, True)
    bar = tqdm(batches, desc=f"epoch {epoch}/{config['epoch']}", leave=False)
    for step, batch in enumerate(bar):
        for group in run.optimizer.param_groups:
            group["lr"] = config["lr"] * (1 - (epoch - 1 + step / len(batches)) / config["epoch"])
        loss = batch_loss(lm, batch, head)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if stop.reason or not math.isfinite(losses[-1]):
            break
    return losses


def validate(lm, data, batch_size):
    """Recall of the trained pairs of data.py (with the epoch's last weights, dropout off, the full LM head:
    measured during the epoch instead, it counted answers that the saved adapter then missed), loss and
    recall on the held-out phrasings (None without them), the KL to the teacher on the questions kept out
    of distillation (asked in other words, the other way round, in a conversation), and the drift."""
    train_recall = evaluate(lm, data.train, batch_size)[1]
    val_loss, val_recall = evaluate(lm, data.val, batch_size) if data.val else (None, None)
    kept_out = {key: [e for e in data.taught_val if e["kind"] == kind] for kind, (key, _, _) in TEACHER_KLS.items()}
    teacher_kls = {key: evaluate(lm, group, batch_size)[0] if group else None for key, group in kept_out.items()}
    drift = evaluate(lm, data.drift, batch_size)[0] if data.drift else None
    return {"train_recall": train_recall, "val_loss": val_loss, "val_recall": val_recall, **teacher_kls,
            "drift": drift}


def not_finite(scores, model):
    """The names of the scores and weights that are nan or inf, or "" when all are finite."""
    names = [name for name, value in scores.items() if value is not None and not math.isfinite(value)]
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        names.append("the LoRA weights")
    return ", ".join(names)


def end_epoch(run, lm, epoch, epoch_started, scores):
    """Record, keep the best adapter, save the state for --resume, print; True to stop early."""
    for key, value in scores.items():
        run.history[key].append(value)
    # best: the most trained answers recalled, then the most held-out phrasings; on a tie the later epoch,
    # which the falling learning rate has settled (README, how the best epoch is chosen: the least KL to the
    # base model, the tie-break before, chose the last epoch in 11 of 12 runs anyway, and one of a plateau else)
    key = [scores["train_recall"], scores["val_recall"] or 0.0]
    if run.best_key is None or key >= run.best_key:
        run.best_epoch, run.best_key = epoch, key
        with replaced_atomically(best_adapter_dir(run.config)) as tmp:
            save_adapter(lm.model, tmp, lm.path)
    run.history["seconds"].append(time.time() - epoch_started)
    save_state(run, lm)
    val_text = f"{scores['val_loss']:.4f} (recall {scores['val_recall']:.0%})" if run.data.val else "-"
    drift_text = f"{scores['drift']:.4f}" if run.data.drift else "-"
    teacher_text = "".join(f"  {name} {scores[key]:.4f}" for key, name, _ in TEACHER_KLS.values()
                           if scores[key] is not None)
    print(f"epoch {epoch:2d}  train {scores['train_loss']:.4f}  val {val_text}  "
          f"recall {scores['train_recall']:.0%}{teacher_text}  drift {drift_text}  "
          f"{run.history['seconds'][-1]:.1f}s"
          f"{'  *best' if run.best_epoch == epoch else ''}")
    # every epoch past full recall moves the model further from what it knew: stop early
    if run.config["early_stop"] and run.history["train_recall"][-2:] == [1.0, 1.0]:
        print("[train] every trained answer recalled for 2 epochs: stopping early")
        return True
    return False


# ----------------------------------------------------------------------------- phase 9: report

def report(lm, qa_data, run, before, config):
    """With the best adapter reloaded from disk (what the user gets is what is checked): recall
    report, forgetting check, metrics.json and the loss plot, answers to `messages`."""
    load_adapter(lm.model, best_adapter_dir(config))
    set_lora_training(lm.model, False)
    with merged(lm.model):
        recall = recall_report(lm, qa_data, run, config["max_new_tokens"])
        after = ask(lm, ORDINARY_QUESTIONS, config["max_new_tokens"])
        samples = ask(lm, messages, config["max_new_tokens"])
    forgetting = [{"question": q, "before": b, "after": a, "changed": a != b}
                  for q, b, a in zip(ORDINARY_QUESTIONS, before, after)]
    changed = sum(f["changed"] for f in forgetting)
    print(f"\n[forgetting] {changed} of {len(forgetting)} ordinary answers changed")
    for f in forgetting:
        if f["changed"]:
            print(f"  {f['question']}\n    before: {f['before'][:70]}\n    after:  {f['after'][:70]}")
    write_outputs(config["output_dir"], run.history, run.best_epoch,
                  {**run.summary(lm), **recall, "forgetting": forgetting})
    print(f"[done] {run.train_seconds:.1f}s of training; best epoch {run.best_epoch}; "
          f"adapter in {best_adapter_dir(config)}")
    for question, answer in zip(messages, samples):
        print(f"\nQ: {question}\nA: {answer}")


def recall_report(lm, qa_data, run, max_new_tokens):
    """Greedy answers to every trained and validation question, each marked exact (it contains the
    expected answer), same fact (in other words: it holds the expected answer's key words, see
    verdict) or wrong. Prints a short table, returns the full list, the exact rates (what
    `*_recall_final` always meant) and the rates counting the same fact too."""
    splits = [(e["index"], "train") for e in run.data.train] + [(e["index"], "val") for e in run.data.val]
    longest = max(len(lm.tokenizer(qa_data[i]["output"]).input_ids) for i, _ in splits)
    started = time.time()
    answers = ask(lm, [question_of(qa_data[i]) for i, _ in splits], max(max_new_tokens, longest + 8))
    seconds = time.time() - started
    rows = []
    for (i, split), answer in zip(splits, answers):
        question, expected = question_of(qa_data[i]), qa_data[i]["output"]
        mark = verdict(question, expected, answer)
        rows.append({"index": i, "split": split, "question": question, "expected": expected, "answer": answer,
                     "verdict": mark, "correct": mark == "exact"})
    train_rows, val_rows = ([r for r in rows if r["split"] == split] for split in ("train", "val"))
    rates = {"train_recall_final": share(train_rows, ("exact",)), "val_recall_final": share(val_rows, ("exact",)),
             "train_same_fact_final": share(train_rows, ("exact", "same fact")),
             "val_same_fact_final": share(val_rows, ("exact", "same fact"))}
    print(f"\n[recall] trained questions: {counts(train_rows)}; "
          + (f"held-out phrasings (the same facts in other words): {counts(val_rows)}" if val_rows
             else "no phrasing held out: write a fact in several ways to measure other words")
          + f" (answered in {seconds:.1f}s)")
    for r in rows:
        question, answer = r["question"].replace("\n", " ")[:30], r["answer"].replace("\n", " ")[:40]
        print(f"  {RECALL_MARKS[r['verdict']]} {r['split']:5s} {question:30s} -> {answer}")
    return {**rates, "answers": rows}


RECALL_MARKS = {"exact": "ok   ", "same fact": "same ", "wrong": "NO   "}


def verdict(question, expected, answer):
    """"exact" when the answer contains the expected one; "same fact" when it holds its key words (the
    words the question does not have, word endings aside: "Mara Lind owns the mill." for "The mill is
    owned by Mara Lind."), all of them, or all but one of more than three (a reworded answer drops a
    "studies"); else "wrong"."""
    if expected.strip() in answer:
        return "exact"
    keys = {stem(w) for w in key_words(question, expected)}
    found = len(keys & {stem(w) for w in words_of(answer)})
    may_miss = 1 if len(keys) > 3 else 0
    return "same fact" if keys and found >= len(keys) - may_miss else "wrong"


def stem(word):
    """An English word without the ending a rewording changes (owned, owns -> own)."""
    return re.sub(r"(ing|ed|es|s)$", "", word) if len(word) >= 4 else word


def share(rows, marks):
    """The share of `rows` marked one of `marks`, None without rows."""
    return sum(r["verdict"] in marks for r in rows) / len(rows) if rows else None


def counts(rows):
    exact, same = (sum(r["verdict"] == mark for r in rows) for mark in ("exact", "same fact"))
    return (f"{exact / len(rows):.0%} exact ({exact}/{len(rows)}), {same} the same fact in other words, "
            f"{len(rows) - exact - same} wrong")


# ============================================================================= helpers
# ----------------------------------------------------------------------------- config

def load_config(path="config.json"):
    """DEFAULTS, overridden by the keys of config.json, checked."""
    config = dict(DEFAULTS)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            user = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(user, dict):
            raise UserError(f"{path}: must be a JSON object {{\"key\": value, ...}}")
        for key in user:
            if key not in DEFAULTS:
                close = difflib.get_close_matches(key, DEFAULTS, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(DEFAULTS)}"
                raise UserError(f"{path}: unknown key {key!r}; {hint}")
        config.update(user)
    check_config(config, path)
    return config


def check_config(config, path):
    def need(key, ok, what):
        if not ok:
            raise UserError(f"{path}: {key} = {json.dumps(config[key], ensure_ascii=False)} must be {what}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    need("model_name", isinstance(config["model_name"], str) and config["model_name"].strip(),
         "a model directory, a .gguf file or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
    need("lora_rank", whole(config["lora_rank"]) and config["lora_rank"] > 0, "a whole number > 0, e.g. 8")
    need("lora_alpha", number(config["lora_alpha"]) and config["lora_alpha"] > 0, "a number > 0, e.g. 16")
    need("lora_dropout", number(config["lora_dropout"]) and 0 <= config["lora_dropout"] < 1,
         "a number in [0, 1)")
    need("target_modules", isinstance(config["target_modules"], list) and config["target_modules"]
         and all(isinstance(m, str) for m in config["target_modules"]),
         'a list of names, e.g. ["q_proj", "v_proj"]')
    need("target_layers", isinstance(config["target_layers"], list) and config["target_layers"]
         and all(whole(i) for i in config["target_layers"]), "a list of layer numbers, e.g. [20, 21, 22, 23]")
    need("lr", number(config["lr"]) and config["lr"] > 0, "a number > 0, e.g. 0.002")
    need("epoch", whole(config["epoch"]) and config["epoch"] > 0, "a whole number > 0")
    need("batch_size", whole(config["batch_size"]) and config["batch_size"] > 0, "a whole number > 0")
    need("val_ratio", number(config["val_ratio"]) and 0 <= config["val_ratio"] < 1, "a number in [0, 1)")
    need("seed", whole(config["seed"]), "a whole number")
    need("max_length", whole(config["max_length"]) and config["max_length"] > 0, "a whole number > 0")
    need("output_dir", isinstance(config["output_dir"], str) and config["output_dir"].strip(),
         "a directory name")
    need("replay", isinstance(config["replay"], bool), "true or false")
    need("teacher_questions", whole(config["teacher_questions"]) and config["teacher_questions"] >= 0,
         "a whole number >= 0 (0 turns distillation off)")
    need("reversed_questions", whole(config["reversed_questions"]) and config["reversed_questions"] >= 0,
         "a whole number >= 0 (0: none)")
    need("conversations", whole(config["conversations"]) and config["conversations"] >= 0,
         "a whole number >= 0 (0: none)")
    need("early_stop", isinstance(config["early_stop"], bool), "true or false")
    need("max_new_tokens", whole(config["max_new_tokens"]) and config["max_new_tokens"] > 0,
         "a whole number > 0")


# ----------------------------------------------------------------------------- batches


def pack(examples, device):
    """One row that holds the start all `examples` share once (the system prompt every chat begins
    with; the facts a teacher reads), then the rest of each, which sees only the start and itself (a
    4D attention mask) at the positions it has in its own sequence: the same numbers as each example
    computed alone, with no padding, and the start computed once. Besides the model's inputs:
    "targets" (the token each position is trained to predict, or IGNORE), "example" (whose position
    it is, -1 for the start), "rows" (each example's positions), targets and cached prefix."""
    first = examples[0]["input_ids"]
    # the start: in every prompt, so that no answer token is in it
    n = common_start([e["input_ids"] for e in examples], min(e["labels"].count(IGNORE) for e in examples) - 1)
    ids, positions, owner, targets = first[:n], list(range(n)), [-1] * n, [IGNORE] * n
    rows = []
    for i, e in enumerate(examples):
        length = len(e["input_ids"])
        rows.append(list(range(n)) + list(range(len(ids), len(ids) + length - n)))
        ids, positions = ids + e["input_ids"][n:], positions + list(range(n, length))
        owner, targets = owner + [i] * (length - n), targets + e["labels"][n + 1:] + [IGNORE]
    owner = torch.tensor(owner)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    mask = causal & ((owner[None, :] == -1) | (owner[None, :] == owner[:, None]))
    batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
             "attention_mask": mask[None, None], "targets": torch.tensor([targets]), "example": owner,
             "rows": rows}
    k = max(e["target_ids"].shape[1] for e in examples)  # one-hot targets are padded with probability 0
    for name in ("target_ids", "target_probs"):
        batch[name] = torch.cat([F.pad(e[name], (0, k - e[name].shape[1])) for e in examples])
    if all("tail" in e for e in examples):  # the logit of what AnswerHead does not compute, per answer position
        batch["tail"] = torch.cat([e["tail"] for e in examples])
    if all("prefix" in e for e in examples):  # cached hidden states, the start's taken once
        batch["prefix"] = torch.cat([examples[0]["prefix"][:n]] + [e["prefix"][n:] for e in examples])[None]
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def shuffled_batches(examples, batch_size, rng):
    """The examples in a new random order, cut into batches."""
    order = rng.sample(examples, len(examples))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------- forward and loss

def final_hidden(lm, batch, needed=None):
    """Last hidden states of a packed batch (see pack), (1, length, hidden): from the cached prefix
    through the upper layers when the batch has one, else the full forward. With `needed` (bool, 1 x
    length: the positions whose output is used) the top layer's MLP runs only there; the other
    positions come out wrong."""
    decoder = lm.model.get_decoder()
    with top_mlp_only_at(decoder.layers[-1], needed):
        if "prefix" not in batch:
            return decoder(input_ids=batch["input_ids"], **packed_inputs(decoder, batch)).last_hidden_state
        with only_layers(decoder, lm.first_lora_layer, len(decoder.layers)):
            return decoder(inputs_embeds=batch["prefix"], **packed_inputs(decoder, batch)).last_hidden_state


def packed_inputs(decoder, batch):
    """What the decoder needs besides the tokens to compute a packed batch as pack() means it."""
    mask = batch["attention_mask"]
    if decoder.config._attn_implementation == "eager":  # it adds the mask to the scores: 0 or -inf
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {"attention_mask": mask, "position_ids": batch["position_ids"], "use_cache": False}


def supervised_logits(lm, batch, head=None):
    """fp32 logits at the supervised positions only (the positions with a target), in the order of
    the batch's examples, over the whole vocabulary or `head`'s tokens (AnswerHead); and those
    positions (bool, 1 x length)."""
    supervised = batch["targets"] != IGNORE
    with bf16_products(lm):
        hidden = final_hidden(lm, batch, needed=supervised)[supervised]
        return (head or lm.model.get_output_embeddings())(hidden).float(), supervised


def answer_head_pays(lm):
    """Whether training computes the LM head over the answer vocabulary only (AnswerHead): where the
    products are fp32 (a CPU without bf16), there the full head is half of a step. Measured on 4 fact
    sets x 3 seeds (tests/eval_knowledge.py, paired with the full head): on the fp32 path other words
    85 / 85%, ordinary kept 94 / 93%, follow-ups 77 / 78%, training 94 -> 73 s a run (AVX2 only: an
    epoch 19 -> 7 s); on the bf16 path, where the full head is cheap, other words 89 / 85% and follow-ups
    89 / 78%: there training keeps the full head."""
    return not uses_bf16(lm)


@dataclass
class AnswerHead:
    """The LM head restricted to a vocabulary: the tokens that training's targets name and that the
    model guessed before training (set_guesses). In fp32 the full head is about half of a training
    step (151,936 rows for every answer token, forward and backward); data.py's answers, the teacher's
    distributions and replay need about 8,000. batch_loss adds the rest as one logit, the base model's
    (set_tails): before training the loss is the full head's. After it, about 1% of the probability lay
    beyond the vocabulary (data.py, scored with the full head) and no greedy choice. Validation and every
    answer use the full head."""
    ids: torch.Tensor  # the vocabulary's token ids, sorted
    rows: torch.Tensor  # for every token id, its row in `weight` (0 for the ids not in the vocabulary)
    weight: torch.Tensor
    bias: torch.Tensor = None

    @classmethod
    def of(cls, lm, ids):
        full = lm.model.get_output_embeddings()
        ids = ids.to(full.weight.device)
        rows = torch.zeros(full.weight.shape[0], dtype=torch.long, device=ids.device)
        rows[ids] = torch.arange(len(ids), device=ids.device)
        return cls(ids, rows, full.weight[ids], None if full.bias is None else full.bias[ids])

    def __call__(self, hidden):
        return F.linear(hidden, self.weight, self.bias)


def kl_to_targets(logits, target_ids, target_probs):
    """Mean over rows of KL(p || softmax(logits)), p given sparsely: probability target_probs[i, j]
    on token target_ids[i, j]. With one token of probability 1 this is plain cross-entropy."""
    log_q = F.log_softmax(logits, dim=-1).gather(1, target_ids)
    p = target_probs
    return (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()


def batch_loss(lm, examples, head=None):
    """Mean KL divergence from each supervised position's target distribution to the model's,
    which is plain cross-entropy where the target is one answer token. The LM head only runs at
    supervised positions, over the whole vocabulary or `head`'s (an AnswerHead, which must hold every
    target token)."""
    batch = pack(examples, lm.model.device)
    return answer_loss(batch, supervised_logits(lm, batch, head)[0], head)


def answer_loss(batch, logits, head=None):
    """batch_loss of a packed batch, given its supervised logits (over `head`'s tokens with a head)."""
    target_ids = batch["target_ids"]
    if head is not None:  # the logits' columns are head.ids, then the rest of the vocabulary (set_tails)
        target_ids = head.rows[target_ids]
        if "tail" in batch:
            logits = torch.cat([logits, batch["tail"][:, None]], 1)
    return kl_to_targets(logits, target_ids, batch["target_probs"])


@torch.no_grad()
def evaluate(lm, examples, batch_size):
    """(token-mean loss, fraction of examples whose whole answer is the greedy choice), dropout off, the
    full LM head. Generation (int8 weights, other rows in its batch) can still flip a token that won by
    a hair: README, how the best epoch is chosen."""
    set_lora_training(lm.model, False)
    total, count, recalled = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch = pack(examples[start:start + batch_size], lm.model.device)
        logits, supervised = supervised_logits(lm, batch)
        n = len(batch["target_ids"])
        total, count = total + answer_loss(batch, logits).item() * n, count + n
        recalled += greedy_hits(batch, logits, supervised)
    return total / max(count, 1), sum(recalled) / max(len(recalled), 1)


def greedy_hits(batch, logits, supervised):
    """Per example of a packed batch, whether the greedy choice is its answer token at every position."""
    wrong = (logits.argmax(-1) != batch["targets"][supervised]).float()
    owners = batch["example"][supervised[0]]
    return (torch.zeros(len(batch["rows"]), device=logits.device).index_add_(0, owners, wrong) == 0).tolist()


# ----------------------------------------------------------------------------- files of a run

def best_adapter_dir(config):
    return os.path.join(config["output_dir"], "best_adapter")


def state_dir(config):
    return os.path.join(config["output_dir"], "last_state")


def save_state(run, lm):
    """Everything --resume needs, as safetensors + JSON (never pickle): adapter, AdamW state,
    RNG states, split, history."""
    with replaced_atomically(state_dir(run.config)) as tmp:
        save_adapter(lm.model, tmp, lm.path)
        optimizer_state = run.optimizer.state_dict()
        tensors = {f"optimizer.{i}.{name}": value.detach().cpu().contiguous()
                   for i, param_state in optimizer_state["state"].items()
                   for name, value in param_state.items()}
        save_file({"torch_rng": torch.get_rng_state(), **tensors}, os.path.join(tmp, "state.safetensors"))
        summary = run.summary(lm)
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"config": run.config, "train_indices": summary["train_indices"],
                       "val_indices": summary["val_indices"], "param_groups": optimizer_state["param_groups"],
                       "history": run.history, "best_epoch": run.best_epoch, "best_key": run.best_key,
                       "train_seconds": run.seconds_so_far(), "python_rng": run.rng.getstate()},
                      f, ensure_ascii=False)


def resumable(config):
    """The directory of an interrupted run's state (see save_state); a UserError when there is none."""
    directory = state_dir(config)
    restore_interrupted_swap(directory)
    if not os.path.exists(os.path.join(directory, "state.json")):
        raise UserError(f"nothing to resume in {directory}: run `python train.py` without --resume")
    return directory


def load_state(run, lm):
    """Put back what save_state() wrote, after checking that config.json and data.py are unchanged."""
    directory = resumable(run.config)
    with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    changed = [k for k in run.config
               if k not in ("epoch", "early_stop") and state["config"].get(k) != run.config[k]]
    if changed:
        raise UserError(f"config.json changed since the interrupted run ({', '.join(changed)}): undo that, "
                        f"or train from scratch without --resume")
    summary = run.summary(lm)
    if (state["train_indices"], state["val_indices"]) != (summary["train_indices"], summary["val_indices"]):
        raise UserError("data.py changed since the interrupted run: undo that, or train from scratch "
                        "without --resume")
    load_adapter(lm.model, directory)
    tensors = load_file(os.path.join(directory, "state.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng"))
    optimizer_state = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        optimizer_state["state"].setdefault(int(index), {})[name] = value
    run.optimizer.load_state_dict(optimizer_state)
    version, internal, gauss = state["python_rng"]
    run.rng.setstate((version, tuple(internal), gauss))
    run.history, run.best_epoch, run.best_key = state["history"], state["best_epoch"], state["best_key"]
    run.seconds_before = state["train_seconds"]
    print(f"[resume] continuing after epoch {len(run.history['train_loss'])} from {directory}")


def write_outputs(out_dir, history, best_epoch, metrics):
    """The loss plot and metrics.json, for however many epochs finished."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = range(1, len(history["train_loss"]) + 1)
    plt.figure(figsize=(6, 4))
    plt.plot(epochs, history["train_loss"], "o-", label="train loss")
    if any(v is not None for v in history["val_loss"]):
        plt.plot(epochs, history["val_loss"], "o-", label="validation loss (held-out phrasings)")
    for key, _, label in TEACHER_KLS.values():
        if any(v is not None for v in history[key]):
            plt.plot(epochs, history[key], "o-", label=label)
    if any(v is not None for v in history["drift"]):
        plt.plot(epochs, history["drift"], "o-", label="drift (KL to the base model, ORDINARY_QUESTIONS)")
    if best_epoch:
        plt.axvline(best_epoch, color="gray", linestyle="--", label=f"best (epoch {best_epoch})")
    plt.xlabel("epoch"), plt.ylabel("loss / KL"), plt.yscale("log")
    plt.legend(fontsize=8), plt.tight_layout()
    plt.savefig(os.path.join(out_dir, "loss_curve.png"), dpi=120)
    plt.close()
    write_json(os.path.join(out_dir, "metrics.json"), metrics)


class StopFlag:
    """The first Ctrl-C asks training to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.reason = None
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        self.reason = "interrupted (Ctrl-C); `python train.py --resume` continues"
        signal.signal(signal.SIGINT, self.previous)

    def release(self):
        signal.signal(signal.SIGINT, self.previous)


# ============================================================================= using the trained model

def load_trained(config):
    """The base model with output/best_adapter merged in, for --ask, --chat and --export."""
    best_dir = trained_adapter_dir(config)
    device, dtype = pick_device()
    path = resolve_model(config["model_name"])
    tokenizer, model = load_model(path, device, dtype)
    adapter_on(model, best_dir, config)
    return LM.of(model, tokenizer, path=path)


def trained_adapter_dir(config):
    """output/best_adapter, or a one-line error when training has not made one yet."""
    best_dir = best_adapter_dir(config)
    restore_interrupted_swap(best_dir)
    if not os.path.exists(os.path.join(best_dir, "adapter_model.safetensors")):
        raise UserError(f"no trained adapter in {best_dir}: run `python train.py` first")
    return best_dir


def chat(lm, max_new_tokens):
    """Multi-turn chat on stdin/stdout: answers stream token by token; /reset, exit or Ctrl-D."""
    from transformers import TextStreamer
    streamer = TextStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
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
            answer, _ = generate(lm, [history], max_new_tokens, streamer=streamer)[0]
            history.append({"role": "assistant", "content": answer})


def export(lm, target, gguf_type):
    """Write base + adapter merged: a GGUF file when `target` ends in .gguf (llama.cpp, Ollama, LM
    Studio), else a plain Hugging Face model directory."""
    model = merge_and_unwrap(lm.model)
    if not target.endswith(".gguf"):
        save_plain(model, lm.tokenizer, target)
        print(f"[export] merged model written to {target}; load it with AutoModelForCausalLM.from_pretrained")
        return
    from gguf_export import modelfile, write_gguf
    try:
        write_gguf(model, lm.tokenizer, target, model_label(lm.path), gguf_type)
    except ValueError as e:  # an architecture it cannot write
        raise UserError(f"--export {target}: {e}") from None
    recipe = write_modelfile(target, modelfile(f"./{os.path.basename(target)}", lm.tokenizer))
    print(f"[export] {gguf_type.upper()} GGUF written to {target}, with an Ollama Modelfile beside it. "
          f"Run it:\n"
          f"  ollama create qwen-lora -f {recipe} && ollama run qwen-lora\n"
          f"  llama-cli -m {target} -cnv    (or llama-server -m {target}; LM Studio: import the file)")


def export_adapter(config, target):
    """Write the best adapter alone as a GGUF LoRA (a few hundred KB) for llama.cpp's --lora and
    Ollama's ADAPTER, on top of a GGUF of the base model (see base_gguf), with a Modelfile beside it."""
    from transformers import AutoConfig, AutoTokenizer
    from gguf_export import modelfile, write_lora_gguf
    best_dir = trained_adapter_dir(config)
    path = resolve_model(config["model_name"])
    directory, kwargs = files_of(path)
    with open(os.path.join(best_dir, "adapter_config.json"), encoding="utf-8") as f:
        alpha = json.load(f)["lora_alpha"]
    try:
        tensors = load_file(os.path.join(best_dir, "adapter_model.safetensors"))
        write_lora_gguf(tensors, AutoConfig.from_pretrained(directory, **kwargs), alpha, target)
        base = base_gguf(path)
    except ValueError as e:  # an architecture it cannot write, an adapter of another model
        raise UserError(f"--export-adapter {target}: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    recipe = write_modelfile(target, modelfile(base, tokenizer, adapter=f"./{os.path.basename(target)}"))
    print(f"[export] LoRA adapter written to {target} ({os.path.getsize(target) / 1e6:.2f} MB) for the base "
          f"{base}, with an Ollama Modelfile beside it. Run it:\n"
          f"  ollama create qwen-lora -f {recipe} && ollama run qwen-lora\n"
          f"  llama-cli -m {base} --lora {target} -cnv    (or llama-server -m {base} --lora {target})")


def base_gguf(path):
    """A GGUF of the base model for llama.cpp and Ollama to put the adapter on: the .gguf model_name
    itself, the offline Qwen's own file, or an F16 one written once into model/ from the model's
    Hugging Face directory (the merged export's writer, with no adapter)."""
    if path.endswith(".gguf"):
        return os.path.abspath(path)
    shipped = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(OFFLINE_GGUF))
    if os.path.basename(os.path.abspath(path)) == os.path.basename(OFFLINE_DIR) and os.path.exists(shipped):
        return shipped  # the offline Qwen, converted from the GGUF beside it
    out = os.path.join("model", f"{model_label(path)}-f16.gguf")
    if not os.path.exists(out):
        from gguf_export import write_gguf
        print(f"[export] writing the base model as {out} once, for the adapter to go on")
        tokenizer, model = load_model(path, torch.device("cpu"), torch.float32)
        os.makedirs("model", exist_ok=True)
        write_gguf(model, tokenizer, out, model_label(path), "f16", finetune=None)
    return os.path.abspath(out)


def adapter_on(model, best_dir, config):
    """Put the saved adapter into `model` (LoRALinear layers shaped as it says), or say in one line that
    it was trained on another model."""
    try:
        inject_saved_adapter(model, best_dir)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{best_dir} does not fit model {config['model_name']!r}: {e}; "
                        f"train again with `python train.py`") from None


def write_modelfile(target, text):
    recipe = os.path.join(os.path.dirname(os.path.abspath(target)), "Modelfile")
    with open(recipe, "w", encoding="utf-8") as f:
        f.write(text)
    return recipe


def model_label(path):
    return os.path.basename(path.rstrip("/")).removesuffix(".gguf")


def check_export_target(target, flag="--export"):
    """Fail before the model loads if the export cannot be written where it is asked for."""
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {target}: cannot write into {parent} (missing or not writable); "
                        f"choose another place")


def main():
    import argparse
    parser = argparse.ArgumentParser(description="Teach a small chat model the facts in data.py with LoRA.")
    parser.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                        help="answer with the trained model and exit (no training); may be repeated")
    parser.add_argument("--chat", action="store_true", help="chat with the trained model")
    parser.add_argument("--export", metavar="DIR or FILE.gguf",
                        help="write base + best adapter merged: a Hugging Face model directory, or with a "
                             ".gguf name one GGUF file for llama.cpp / Ollama / LM Studio")
    parser.add_argument("--export-adapter", metavar="FILE.gguf",
                        help="write the best adapter alone as a GGUF LoRA for llama.cpp's --lora and "
                             "Ollama's ADAPTER, on top of a GGUF of the base model")
    parser.add_argument("--gguf-type", choices=OUT_TYPES, default="f16",
                        help="number type of a merged GGUF export (default f16; q8_0 is half the size, q4_0 "
                             "about a third)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    args = parser.parse_args()
    try:
        config = load_config()
        if not (args.ask or args.chat or args.export or args.export_adapter):
            return train(config, resume=args.resume)
        if args.export_adapter:
            check_export_target(args.export_adapter, "--export-adapter")
            export_adapter(config, args.export_adapter)
            if not (args.ask or args.chat or args.export):
                return
        if args.export:
            check_export_target(args.export)
        lm = load_trained(config)
        with merged(lm.model):
            for question, answer in zip(args.ask, ask(lm, args.ask, config["max_new_tokens"])):
                print(f"Q: {question}\nA: {answer}")
            if args.chat:
                chat(lm, config["max_new_tokens"])
        if args.export:
            export(lm, args.export, args.gguf_type)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
