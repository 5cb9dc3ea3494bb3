"""generate(), the one inference path: each answer stops at its own end (end of turn, a number of lines, the
token limit); batching, the shared start run once, padding and rows leaving the batch give what each prompt
alone gives; the int8 copies of the layers compute what the fp32 ones do within their rounding and are made
again only when the weights change; sampling keeps to the nucleus."""
import os
import subprocess
import sys

import pytest
import torch

import chat_model
from conftest import ROOT, tiny_model
from inject import inject_lora, merged


class CannedModel(torch.nn.Module):
    """Stands in for a model whose greedy answer to a prompt of `prompt_length` tokens is `answer`, then
    `end`: the token it picks depends only on the position it predicts."""
    config = None
    device = torch.device("cpu")

    def __init__(self, answer, end, prompt_length, vocab_size):
        super().__init__()
        self.answer, self.end, self.prompt_length, self.vocab_size = answer, end, prompt_length, vocab_size

    def forward(self, input_ids, position_ids=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row, position in enumerate([] if position_ids is None else position_ids[:, -1].tolist()):
            step = position - self.prompt_length + 1
            logits[row, -1, self.answer[step] if step < len(self.answer) else self.end] = 1.0
        return type("Output", (), {"logits": logits})


@pytest.fixture
def tokenizer(qwen_tokenizer):
    return qwen_tokenizer


def canned_lm(tokenizer, answer, end):
    """The model that answers "Q?" with the tokens of `answer`, then `end`."""
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    model = CannedModel(ids, end, len(chat_model.prompt_ids(tokenizer, "Q?")), len(tokenizer))
    return chat_model.LM.of(model, tokenizer), ids


def test_answers_stop_at_the_end_of_turn_or_the_limit_and_say_which(tokenizer):
    lm, words = canned_lm(tokenizer, "Paris is nice", end=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert chat_model.generate(lm, ["Q?", "Q?"], 8) == [("Paris is nice", True)] * 2
    assert chat_model.generate(lm, ["Q?"], len(words) - 1) == [("Paris is", False)]  # cut before its end


def test_an_answer_of_lines_stops_after_as_many_lines(tokenizer):
    lm, _ = canned_lm(tokenizer, "\nWhere is it?\nWhen was it?\nWho made it?\n", end=0)  # a blank line first
    assert chat_model.generate(lm, ["Q?"], 40, lines=2) == [("Where is it?\nWhen was it?", True)]
    assert chat_model.generate(lm, ["Q?"], 40, lines=1) == [("Where is it?", True)]


@pytest.fixture
def tiny_lm(qwen_tokenizer):
    """A random 4-layer Qwen2 with Qwen's tokenizer (untied: a tied random head repeats the prompt)."""
    return chat_model.LM.of(tiny_model("qwen2", vocab_size=len(qwen_tokenizer), tie=False), qwen_tokenizer)


def one_at_a_time(lm, prompt, max_new_tokens, stop):
    """Greedy answer of one prompt, the whole sequence run again at every step: no cache, no batch."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == stop:
                break
            ids.append(token)
    return ids[len(prompt):]


def test_batches_with_a_shared_start_padding_and_rows_that_finish_early_answer_as_one_prompt_alone(
        tiny_lm, monkeypatch):
    monkeypatch.setattr(chat_model, "generation_copy", lambda lm: None)  # fp32: exactness
    questions = ["Q?", "A longer question?", "Another question, longer still?", "Why?"]
    prompts = [chat_model.prompt_ids(tiny_lm.tokenizer, q) for q in questions]
    free = [one_at_a_time(tiny_lm, p, 10, stop=None) for p in prompts]
    stop = free[1][3]  # a token the second answer reaches at its 4th step: it finishes early there
    expected = [answer[:answer.index(stop)] if stop in answer else answer for answer in free]
    assert len({len(a) for a in expected}) > 1  # rows finish at different steps
    monkeypatch.setattr(tiny_lm, "eot_id", stop)
    answers = chat_model.generate(tiny_lm, questions, 10, batch_size=3)
    assert [text for text, _ in answers] == [tiny_lm.tokenizer.decode(a, skip_special_tokens=True).strip()
                                            for a in expected]
    assert [finished for _, finished in answers] == [len(a) < 10 for a in expected]


def test_a_prompt_asked_several_times_is_computed_once_and_sampled_in_every_row(tiny_lm, monkeypatch):
    monkeypatch.setattr(chat_model, "generation_copy", lambda lm: None)  # fp32: exactness
    questions = ["Q?", "Why?", "Q?", "Q?"]
    alone = [one_at_a_time(tiny_lm, chat_model.prompt_ids(tiny_lm.tokenizer, q), 6, stop=None) for q in questions]
    rows, forward = [], tiny_lm.model.forward
    monkeypatch.setattr(tiny_lm.model, "forward", lambda **kw: rows.append(len(kw["input_ids"])) or forward(**kw))
    answers = chat_model.generate(tiny_lm, questions, 6)
    assert rows[1] == 2  # after the shared start, the rest of "Q?" and of "Why?", each once
    assert [text for text, _ in answers] == [tiny_lm.tokenizer.decode(a, skip_special_tokens=True).strip()
                                            for a in alone]
    rows.clear()
    torch.manual_seed(0)
    sampled = chat_model.generate(tiny_lm, ["Q?"] * 8, 6, temperature=2.0)
    assert rows[1] == 1 and len(set(sampled)) > 1  # one prompt computed, eight rows drawn apart


def test_a_batch_ends_where_the_next_prompt_would_shrink_the_shared_start_by_more_than_a_batch_costs():
    a, b, c = [1] * 10 + [2], [1] * 10 + [3], [1] * 10 + [4]  # 10 tokens shared
    d = [1, 5, 6]  # shares one token with them
    sequences = [d, b, a, c]
    # d with a, b and c: 1 token shared, two rows compute 9 tokens more each, 18 against the 1 d saves
    assert chat_model.batches_by_start(sequences, 8) == [[2, 1, 3], [0]]
    assert chat_model.batches_by_start(sequences, 8, batch_cost=20) == [[2, 1, 3, 0]]
    assert chat_model.batches_by_start(sequences, 2) == [[2, 1], [3, 0]]  # c alone: d joins it


def int8_error_and_bound():
    """Int8Linear's error on a small product, and the bound its rounding allows."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 5)
    x = torch.randn(3, 2, 16)
    copy = chat_model.Int8Linear(linear)
    # each weight is off by at most half its row's step, each input by half its row's step
    w_step = linear.weight.abs().amax(1) / chat_model.WEIGHT_STEPS
    x_step = x.abs().amax(-1, keepdim=True) / 127
    bound = (x.abs() @ (w_step[:, None] / 2).expand(5, 16).T
             + (x_step / 2) * (linear.weight.abs() + w_step[:, None] / 2).sum(1))
    with torch.no_grad():
        assert copy(x).shape == (3, 2, 5)
        return (copy(x) - linear(x)).abs(), bound


def test_int8_copy_computes_the_product_within_its_rounding():
    error, bound = int8_error_and_bound()
    assert (error <= bound + 1e-6).all() and error.max() > 0


def test_int8_copy_is_right_on_a_cpu_without_vnni():
    """torch's int8 product on AVX2 adds pairs of byte products in 16 bits: 8-bit weights overflowed."""
    check = ("import test_generate; error, bound = test_generate.int8_error_and_bound(); "
             "assert (error <= bound + 1e-6).all(), error.max()")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    done = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_generation_copies_are_made_once_and_again_when_merge_changes_the_weights(tiny_lm, monkeypatch):
    monkeypatch.setattr(chat_model, "generation_copy", lambda lm: chat_model.Int8Linear)
    inject_lora(tiny_lm.model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    q_proj = tiny_lm.model.model.layers[3].self_attn.q_proj
    torch.nn.init.normal_(q_proj.lora_B)
    chat_model.generate(tiny_lm, ["Q?"], 2)
    copies = {module: copy for module, (_, copy) in tiny_lm.copies.items()}
    chat_model.generate(tiny_lm, ["Q?"], 2)
    assert all(tiny_lm.copies[module][1] is copy for module, copy in copies.items())  # reused
    with merged(tiny_lm.model):
        chat_model.generate(tiny_lm, ["Q?"], 2)
    assert tiny_lm.copies[q_proj.base][1] is not copies[q_proj.base]  # B @ A was added to its weight
    assert tiny_lm.copies[tiny_lm.model.lm_head][1] is copies[tiny_lm.model.lm_head]
    assert isinstance(tiny_lm.model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # put back after


def test_sampling_keeps_to_the_nucleus_and_greedy_takes_the_most_likely():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * 60]).clamp_min(1e-30))
    assert chat_model.next_tokens(logits, None).tolist() == [0]
    torch.manual_seed(0)
    drawn = {chat_model.next_tokens(logits, 1.0, top_p=0.9).item() for _ in range(300)}
    assert drawn == {0, 1, 2}  # 0.5 + 0.3 < 0.9 <= 0.5 + 0.3 + 0.15: the 4th never
