"""The chat model as train.py and the teacher talk to it.

LM is the model with its tokenizer and the token ids train.py needs; prompt_ids() and encode() turn a
conversation into the chat template's tokens, exactly as at inference; the bf16 helpers say where
matrix products run in bf16; generate() is the one inference path that every caller uses (the teacher's
questions and answers, the base model's answers, the recall report, --ask and --chat).
Needs nothing from the other modules.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

@dataclass
class LM:
    """The chat model being taught, with what train.py needs to know of its tokens and layers."""
    model: torch.nn.Module
    tokenizer: object
    eot_id: int  # end of turn: the last token of every answer, where generation stops
    pad_id: int
    first_lora_layer: int = 0  # the layers below it never change (see cache_frozen_prefix)
    path: str = ""  # where the model was loaded from, written into the adapter and metrics.json
    copies: dict = field(default_factory=dict, repr=False)  # its layers' generation copies, see generation_weights

    @classmethod
    def of(cls, model, tokenizer, **fields):
        eot_id = end_of_turn_id(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id
        return cls(model, tokenizer, eot_id, pad_id, **fields)


def question_of(item):
    """The user's turn: instruction, plus input when there is one."""
    return (item["instruction"] + "\n" + item["input"]).strip() if item.get("input") else item["instruction"]


IGNORE = -100  # label of positions that carry no loss (prompt and padding)


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
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    tail = text.split(marker, 1)[1].strip()
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    return ids[0] if ids else tokenizer.eos_token_id


def encode(lm, question, answer, finished=True):
    """input_ids = prompt + answer (+ end-of-turn); labels keep only the answer and end-of-turn.
    `finished=False` is for replay answers cut at REPLAY_MAX_TOKENS: they get no end-of-turn.
    Each supervised position also gets a target distribution (target_ids, target_probs): here
    all mass on the answer token; replay examples later get the base model's own distribution."""
    target = lm.tokenizer(answer, add_special_tokens=False).input_ids + ([lm.eot_id] if finished else [])
    return make_example(prompt_ids(lm.tokenizer, question), target)


def make_example(prompt, target):
    return {"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target,
            "target_ids": torch.tensor(target)[:, None], "target_probs": torch.ones(len(target), 1)}


# bf16 matrix products on CPUs that have them (AVX512-BF16, AMX): the LM head runs ~3x, a training step ~1.4x
# faster than in fp32. The LoRA tensors and the loss stay fp32, and so do the stored weights (merge, export);
# training and caching use bf16 copies of the frozen ones (frozen_weights_in_bf16). Most laptop CPUs have no
# bf16 instructions (there bf16 products are ~10x slower than fp32): QWEN_LORA_FP32=1 takes their path on any CPU.
CPU_BF16 = not os.environ.get("QWEN_LORA_FP32") and any(getattr(torch.cpu, check, lambda: False)()
                                                        for check in ("_is_avx512_bf16_supported",
                                                                      "_is_amx_tile_supported"))


def uses_bf16(lm):
    device = lm.model.device.type
    return device == "cuda" or (device == "cpu" and CPU_BF16)


def bf16_products(lm):
    """Matrix products in bf16 (autocast) where the hardware has them, everything else in fp32."""
    return torch.autocast(lm.model.device.type, dtype=torch.bfloat16, enabled=uses_bf16(lm))


@contextmanager
def frozen_weights_in_bf16(lm, modules):
    """Autocast casts a weight to bf16 at every product (it keeps the cast only for trained tensors),
    and on a CPU the cast of a frozen weight costs about as much as the product. So while the block
    runs, the frozen nn.Linear weights of `modules` are bf16 copies, and the fp32 ones come back
    after (a tied LM head gets a copy of its own; the input embedding stays fp32)."""
    linears = [m for module in modules for m in module.modules()
               if isinstance(m, nn.Linear) and not m.weight.requires_grad] if uses_bf16(lm) else []
    saved = [(m, m.weight) for m in linears]
    for m in linears:
        m.weight = nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for m, weight in saved:
            m.weight = weight


# ----------------------------------------------------------------------------- generation

class Bf16Linear(nn.Module):
    """A frozen nn.Linear for generation on CUDA: its weight as bf16."""

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight.detach().to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x):
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


WEIGHT_STEPS = 63  # Int8Linear's weight levels each side of zero


class Int8Linear(nn.Module):
    """A frozen nn.Linear for generation on a CPU: the weight in int8 with a scale per
    output row, each input row in int8 with a scale of its own, the product in int8 (torch._int_mm):
    ~2.5x faster than fp32 on AVX2 at the few rows a decoding step has, a quarter of the memory.
    The weight uses 7 bits (-63..63): without VNNI (AVX2) the product adds pairs of byte products
    in 16 bits, which full-range int8 weights overflow (errors of ~20% of the result, measured)."""

    def __init__(self, linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.scale = (weight.abs().amax(1) / WEIGHT_STEPS).clamp_min(1e-12)
        self.weight_t = torch.round(weight / self.scale[:, None]).to(torch.int8).T  # (in, out)
        self.bias = linear.bias

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1]).float()
        row_scale = (rows.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)
        products = torch._int_mm(torch.round(rows / row_scale).to(torch.int8), self.weight_t)
        out = products * (row_scale * self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def generation_copy(lm):
    """What generation computes the frozen nn.Linear layers with: int8 copies on every CPU (sampling 64
    answers: 2.5x fp32 with AVX2 only, 45.5 vs 17.9 tokens/s; 1.6x bf16 on an AVX512-BF16 CPU, 76.5
    vs 47.0), bf16 ones on CUDA, None elsewhere (MPS: fp32)."""
    device = lm.model.device.type
    return Int8Linear if device == "cpu" else Bf16Linear if device == "cuda" else None


@contextmanager
def generation_weights(lm):
    """While the block runs, every nn.Linear of the model is replaced by its generation copy
    (generation_copy). The copies are made once and kept on `lm` while the weights stay as they are:
    merge() changes them in place (a new tensor version), and then they are made again."""
    kind = generation_copy(lm)
    # not a LoRA's A and B where they are nn.Linear (PEFT, which the tests load): they are the adapter
    swaps = [(parent, name, child) for path, parent in list(lm.model.named_modules())
             for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and ".lora_" not in f".{path}.{name}"] if kind else []
    for parent, name, child in swaps:
        made_for = (kind, child.weight._version)
        if lm.copies.get(child, (None,))[0] != made_for:
            lm.copies[child] = (made_for, kind(child))
        setattr(parent, name, lm.copies[child][1])
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


@torch.no_grad()
def generate(lm, conversations, max_new_tokens, temperature=None, lines=None, streamer=None, batch_size=32):
    """Greedy (or, with a `temperature`, sampled) answers to `conversations` (questions or message lists,
    see prompt_ids). Each answer stops at its own end-of-turn, or once it has `lines` lines (a rephrased
    question is one line, a list of five questions five), or at `max_new_tokens`. Returns [(text,
    finished)], finished meaning it reached its end. The one inference path of train.py: the teacher's
    questions and answers, the base model's answers, the recall report, the forgetting check, sample
    answers, --ask and --chat all use it. A `streamer` (batch of one) prints the answer token by token.
    Prompts are sorted so that a batch shares a long start (the teacher's facts, the system prompt),
    which runs once for the batch; finished rows leave the batch."""
    prompts = [prompt_ids(lm.tokenizer, c) for c in conversations]
    results = [None] * len(prompts)
    with generation_weights(lm):
        # a batch more repeats every decode step, each reading all the weights once: on a CPU about
        # the time of computing 4 prompt tokens (0.5 GB of int8 at 13.5 GB/s: 37 ms; a token's 1 GFLOP
        # in int8: ~10 ms)
        for chunk in batches_by_start(prompts, batch_size, batch_cost=4 * max_new_tokens):
            answers = decode(lm, [prompts[i] for i in chunk], max_new_tokens, temperature, lines, streamer)
            for i, (tokens, finished) in zip(chunk, answers):
                results[i] = (lm.tokenizer.decode(tokens, skip_special_tokens=True).strip(), finished)
    return results


def decode(lm, prompts, max_new_tokens, temperature, lines, streamer):
    """[(answer tokens, finished)] for a batch of prompt token lists (see generate). A prompt asked
    several times (samples of one request) is computed once, its keys and values repeated per row."""
    device, stops = lm.model.device, {lm.eot_id, lm.tokenizer.eos_token_id}
    distinct = list(dict.fromkeys(map(tuple, prompts)))
    repeat = torch.tensor([distinct.index(tuple(p)) for p in prompts], device=device)
    shared, cache = shared_start(lm, distinct)
    width = max(map(len, distinct))  # the rest of each prompt is left-padded after the shared start
    mask = torch.tensor([[1] * shared + [0] * (width - len(p)) + [1] * (len(p) - shared) for p in distinct],
                        device=device)
    ids = torch.tensor([[lm.pad_id] * (width - len(p)) + list(p[shared:]) for p in distinct], device=device)
    positions = (mask.cumsum(1) - 1).clamp_min(0)[:, shared:]
    logits = next_logits(lm, ids, mask, positions, cache)
    cache.batch_select_indices(repeat)
    logits, mask, positions = logits[repeat], mask[repeat], positions[repeat][:, -1:]
    answers, finished, counts = [[] for _ in prompts], [False] * len(prompts), LineCounts(lm, len(prompts))
    rows = list(range(len(prompts)))  # the rows still answering, in the batch's order
    if streamer is not None:
        streamer.put(torch.tensor(prompts[0]))
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, temperature).tolist()
        for row, token in zip(rows, chosen):
            if token in stops:
                finished[row] = True
            else:
                answers[row].append(token)
                finished[row] = bool(lines) and counts.add(row, token) >= lines
        if streamer is not None and not finished[0]:
            streamer.put(torch.tensor([chosen[0]]))
        going = [j for j, row in enumerate(rows) if not finished[row]]
        if not going or step == max_new_tokens - 1:
            break
        if len(going) < len(rows):  # finished rows leave the batch
            keep = torch.tensor(going, device=device)
            cache.batch_select_indices(keep)
            mask, positions = mask[keep], positions[keep]
        rows = [rows[j] for j in going]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], 1)
        positions = positions + 1
        logits = next_logits(lm, torch.tensor([[chosen[j]] for j in going], device=device), mask, positions, cache)
    if streamer is not None:
        streamer.end()
    return list(zip(answers, finished))


def next_logits(lm, ids, mask, positions, cache):
    """The logits of the token after `ids` (batch x new tokens), extending `cache`."""
    return lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1]


def shared_start(lm, prompts):
    """(n, cache): the first n tokens, which every prompt has (and a token more), run once through the
    model, their keys and values repeated for every prompt."""
    from transformers import DynamicCache
    n = common_start(prompts, min(map(len, prompts)) - 1)
    cache = DynamicCache(config=lm.model.config)
    if n:
        lm.model(input_ids=torch.tensor([prompts[0][:n]], device=lm.model.device), cache=cache,
                 use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(prompts))
    return n, cache


def batches_by_start(sequences, batch_size, batch_cost=0):
    """The indices of `sequences` (token lists) in sorted order, cut into batches of at most
    batch_size, each of which computes the start its sequences share once. A batch ends early where
    the next sequence would shrink that start by more than a batch of its own costs (`batch_cost`
    tokens computed): two kinds of prompt in one batch (worked examples in two languages, teachers
    reading other facts) share only the system prompt, and every row then computes the rest of its
    start alone (a batch of 32 rephrasings took 26 s instead of 4 s)."""
    batches, shared = [], 0
    for i in sorted(range(len(sequences)), key=lambda i: sequences[i]):
        sequence = sequences[i]
        if batches and len(batches[-1]) < batch_size:
            first = sequences[batches[-1][0]]  # sorted: what it shares with the last, all of them share
            now = min(shared, common_start([first, sequence], min(len(first), len(sequence))))
            # in this batch it costs its own rest, and each other row the start no longer shared
            if (len(batches[-1]) - 1) * (shared - now) - now <= batch_cost:
                batches[-1].append(i)
                shared = now
                continue
        batches.append([i])
        shared = len(sequence)
    return batches


def common_start(sequences, limit):
    """How many first tokens all `sequences` share, `limit` at most."""
    n = 0
    while n < limit and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def next_tokens(logits, temperature, top_p=0.95, candidates=64):
    """The greedy choice, or a sample at `temperature` from the smallest set of the most likely tokens
    holding `top_p` of the probability, looked for among the `candidates` most likely (no sort of
    the whole vocabulary at every step)."""
    if not temperature:
        return logits.argmax(-1)
    top = torch.topk(logits.float() / temperature, candidates, dim=-1)
    probs = F.softmax(top.values, dim=-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0)  # beyond the nucleus
    return top.indices.gather(1, torch.multinomial(probs, 1))[:, 0]


class LineCounts:
    """How many lines each row's answer has finished (a line counts once it holds some text)."""

    def __init__(self, lm, rows):
        self.tokenizer, self.lines, self.in_line = lm.tokenizer, [0] * rows, [False] * rows

    def add(self, row, token):
        for char in self.tokenizer.decode([token]):
            if char == "\n" and self.in_line[row]:
                self.lines[row], self.in_line[row] = self.lines[row] + 1, False
            elif not char.isspace():
                self.in_line[row] = True
        return self.lines[row]
