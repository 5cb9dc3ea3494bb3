"""Chat formatting on the real Qwen tokenizer (ChatML), in both arrangements of its special tokens:
pad != end of turn (Qwen2.5-Instruct) and pad = end of turn (as SmolLM2 and other ChatML models have it)."""
import os

import pytest

import chat_model
import train


@pytest.fixture(params=["pad is end of turn", "pad is <|endoftext|>"])
def tokenizer(request, pad_is_eot_tokenizer, qwen_tokenizer):
    return pad_is_eot_tokenizer if request.param == "pad is end of turn" else qwen_tokenizer


@pytest.fixture
def lm(tokenizer):
    return chat_model.LM.of(None, tokenizer)


def test_end_of_turn_is_im_end_whatever_the_pad_token(tokenizer, lm):
    assert tokenizer.convert_ids_to_tokens(lm.eot_id) == "<|im_end|>"
    assert lm.pad_id == tokenizer.pad_token_id
    # a pad that is the stop token itself must not mask the stop token; Qwen's pad is another token
    assert (tokenizer.pad_token == "<|im_end|>") == (lm.pad_id == lm.eot_id)


def test_labels_mask_the_prompt_and_keep_answer_and_end_of_turn(tokenizer, lm):
    example = chat_model.encode(lm, "Who is hiahia?", "A student.")
    ids, labels = example["input_ids"], example["labels"]
    prompt = chat_model.prompt_ids(tokenizer, "Who is hiahia?")
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [chat_model.IGNORE] * len(prompt)
    supervised = [t for t in labels if t != chat_model.IGNORE]
    assert tokenizer.decode(supervised) == "A student.<|im_end|>"
    assert supervised[-1] == lm.eot_id and ids[-1] == lm.eot_id


def test_training_text_is_the_inference_template_plus_answer(tokenizer, lm):
    example = chat_model.encode(lm, "Q?", "A.")
    full = tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                                         tokenize=False)
    assert full.startswith(tokenizer.decode(example["input_ids"]))  # the template ends the turn with <|im_end|>\n


def test_a_packed_batch_trains_the_answers_and_end_of_turn_only(lm):
    short, long = chat_model.encode(lm, "Q?", "A."), chat_model.encode(lm, "A longer question?", "B.")
    batch = train.pack([short, long], "cpu")
    trained = batch["targets"][batch["targets"] != chat_model.IGNORE].tolist()
    answers = [t for e in (short, long) for t in e["labels"] if t != chat_model.IGNORE]
    assert trained == answers and trained.count(lm.eot_id) == 2  # even where pad and end of turn are one token
    shared = len(os.path.commonprefix([short["input_ids"], long["input_ids"]]))  # the system prompt and more
    assert shared > 10 and batch["input_ids"].shape[1] == len(short["input_ids"]) + len(long["input_ids"]) - shared


def test_question_appends_input():
    assert chat_model.question_of({"instruction": "Translate:", "input": "你好", "output": "Hello"}) == "Translate:\n你好"
    assert chat_model.question_of({"instruction": "Q?", "input": "", "output": "A"}) == "Q?"
