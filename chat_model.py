"""The chat model as train.py and the teacher talk to it.

LM is the model with its tokenizer and the token ids train.py needs; prompt_ids() and encode() turn a
conversation into the chat template's tokens, exactly as at inference; the bf16 helpers say where
matrix products run in bf16; generate() is the one inference path that every caller uses (the teacher's
questions and answers, the base model's answers, the recall report, --ask and --chat).
Needs nothing from the other modules.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch

@dataclass
class LM:
    """The chat model being taught, with what train.py needs to know of its tokens and layers."""
    model: torch.nn.Module
    tokenizer: object
    eot_id: int  # end of turn: the last token of every answer, where generation stops
    pad_id: int
    first_lora_layer: int = 0  # the layers below it never change (see cache_frozen_prefix)
    path: str = ""  # where the model was loaded from, written into the adapter and metrics.json

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
# training, caching and generation use bf16 copies of the frozen ones (frozen_weights_in_bf16).
CPU_BF16 = any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


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
               if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad] if uses_bf16(lm) else []
    saved = [(m, m.weight) for m in linears]
    for m in linears:
        m.weight = torch.nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for m, weight in saved:
            m.weight = weight


@torch.no_grad()
def generate(lm, conversations, max_new_tokens, batch_size=16, streamer=None, temperature=None):
    """Greedy (or, with a `temperature`, sampled) answers to `conversations` (questions or message lists,
    see prompt_ids), stopping at end-of-turn. Returns [(text, finished)]. The one inference path of
    train.py: replay and teacher answers, the questions the teacher answers, the recall report, the
    forgetting check, sample answers, --ask and --chat all use it.
    A `streamer` (batch of one) prints the answer token by token."""
    tokenizer, stops = lm.tokenizer, [lm.eot_id, lm.tokenizer.eos_token_id]
    results = []
    with frozen_weights_in_bf16(lm, [lm.model]), bf16_products(lm):  # ~1.7x faster on this CPU
        for start in range(0, len(conversations), batch_size):
            prompts = [prompt_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
            width = max(map(len, prompts))  # left padding, so every answer starts at column `width`
            ids = torch.tensor([[lm.pad_id] * (width - len(p)) + p for p in prompts], device=lm.model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                device=lm.model.device)
            out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    eos_token_id=stops, pad_token_id=lm.pad_id, streamer=streamer,
                                    **(dict(do_sample=True, temperature=temperature, top_p=0.95)
                                       if temperature else dict(do_sample=False)))
            for row in out[:, width:].tolist():
                stop = next((i for i, t in enumerate(row) if t in stops), len(row))
                text = tokenizer.decode(row[:stop], skip_special_tokens=True).strip()
                results.append((text, stop < len(row)))
    return results
