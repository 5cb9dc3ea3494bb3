"""Chat formatting on the real Qwen tokenizer (ChatML), in both arrangements of its special tokens:
pad != end of turn (Qwen2.5-Instruct) and pad = end of turn (as SmolLM2 and other ChatML models have it)."""
import pytest
import torch

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


def test_padding_carries_no_loss_and_the_end_of_turn_keeps_its_label(lm):
    short, long = chat_model.encode(lm, "Q?", "A."), chat_model.encode(lm, "A longer question?", "B.")
    batch = train.collate([short, long], lm.pad_id, "cpu")
    n = len(short["input_ids"])
    assert (batch["input_ids"][0, n:] == lm.pad_id).all() and batch["attention_mask"][0, n:].sum() == 0
    assert (batch["labels"][0, n:] == chat_model.IGNORE).all()
    assert batch["labels"][0, n - 1] == lm.eot_id  # even where pad and end of turn are one token
    assert (batch["labels"][0, :n] == batch["labels"].new_tensor(short["labels"])).all()


class CannedModel(torch.nn.Module):
    """Stands in for a model whose greedy answer is fixed: `row` after every prompt."""
    device = torch.device("cpu")

    def __init__(self, row):
        super().__init__()
        self.row = row

    def generate(self, input_ids, eos_token_id, **kwargs):
        self.stops = eos_token_id
        return torch.cat([input_ids, torch.tensor([self.row] * len(input_ids))], dim=1)


def test_generation_stops_at_end_of_turn_and_says_whether_the_answer_finished(tokenizer, lm):
    words = tokenizer("Paris is nice", add_special_tokens=False).input_ids
    finished = CannedModel(words + [lm.eot_id, lm.pad_id, lm.pad_id])  # generate pads a row that has ended
    assert chat_model.generate(chat_model.LM.of(finished, tokenizer), ["Q?", "Another Q?"], 8) == [("Paris is nice", True)] * 2
    assert lm.eot_id in finished.stops
    cut = CannedModel(words)  # ran out of max_new_tokens before the end of turn
    assert chat_model.generate(chat_model.LM.of(cut, tokenizer), ["Q?"], 3) == [("Paris is nice", False)]


def test_question_appends_input():
    assert chat_model.question_of({"instruction": "Translate:", "input": "你好", "output": "Hello"}) == "Translate:\n你好"
    assert chat_model.question_of({"instruction": "Q?", "input": "", "output": "A"}) == "Q?"
