"""Question variants and question noise: deterministic under the seed, cached in a readable file,
never a held-out phrasing, and noise only on the facts' question tokens."""
import json
import random

import pytest
import torch

import train
from conftest import tiny_model
from inject import inject_lora

QA = [{"instruction": "What is the name of Zorblat's cat?", "input": "", "output": "Pimbo."},
      {"instruction": "Zorblat的猫叫什么名字？", "input": "", "output": "Pimbo。"},
      {"instruction": "What is Zorblat's cat called?", "input": "", "output": "Pimbo."}]


@pytest.fixture
def lm(qwen_tokenizer):
    return train.LM.of(None, qwen_tokenizer)


def config(tmp_path, **changes):
    return dict(train.DEFAULTS, output_dir=str(tmp_path), **changes)


def pairs(lm, indices):
    return [dict(train.encode(lm, QA[i]["instruction"], QA[i]["output"]), index=i, fact=train.fact_of(QA[i]["output"]))
            for i in indices]


def test_words_are_dropped_by_the_seed_and_chinese_by_characters():
    english = train.drop_words("What is the name of Zorblat's cat?", 3, random.Random(1))
    assert english == train.drop_words("What is the name of Zorblat's cat?", 3, random.Random(1))
    assert english != train.drop_words("What is the name of Zorblat's cat?", 3, random.Random(2))
    assert len(set(english)) == 3 and "What is the name of Zorblat's cat?" not in english
    assert all(set(v.split()) < set("What is the name of Zorblat's cat?".split()) for v in english)
    chinese = train.drop_words("猫叫什么名字？", 3, random.Random(1))
    assert len(chinese) == 3 and all(" " not in v and len(v) < len("猫叫什么名字？") for v in chinese)
    assert train.drop_words("猫", 3, random.Random(1)) == []  # nothing shorter to make


def test_variants_are_trained_with_the_answer_cached_and_drawn_again_only_for_another_seed(lm, tmp_path):
    examples = train.question_variants(lm, QA, pairs(lm, [0, 1]), [], config(tmp_path))
    saved = json.loads((tmp_path / "question_variants.json").read_text())
    assert saved["seed"] == 42 and saved["count"] == 3
    assert list(saved["variants"]) == [QA[0]["instruction"], QA[1]["instruction"]]
    variants = [v for vs in saved["variants"].values() for v in vs]
    assert len(examples) == len(variants) == 6
    drawn = saved["variants"]
    expected = [train.encode(lm, v, QA[i]["output"]) for i in (0, 1) for v in drawn[QA[i]["instruction"]]]
    assert [e["input_ids"] for e in examples] == [e["input_ids"] for e in expected]
    assert all("index" not in e for e in examples)  # not data.py's pairs: not in the recall

    saved["variants"][QA[0]["instruction"]] = ["Zorblat cat name?"] * 3  # edited by hand: used as they are
    (tmp_path / "question_variants.json").write_text(json.dumps(saved))
    again = train.question_variants(lm, QA, pairs(lm, [0, 1]), [], config(tmp_path))
    assert again[0]["input_ids"] == train.encode(lm, "Zorblat cat name?", "Pimbo.")["input_ids"]
    other_seed = train.question_variants(lm, QA, pairs(lm, [0, 1]), [], config(tmp_path, seed=7))
    assert [e["input_ids"] for e in other_seed] != [e["input_ids"] for e in again]
    elsewhere = tmp_path / "fresh"  # no cache: the same seed draws the same variants
    elsewhere.mkdir()
    assert [e["input_ids"] for e in train.question_variants(lm, QA, pairs(lm, [0, 1]), [], config(elsewhere))] \
        == [e["input_ids"] for e in examples]
    more = train.question_variants(lm, QA, pairs(lm, [0, 1]), [], config(tmp_path, seed=7,
                                                                          question_variants=4))
    assert len(more) == 8


def test_a_variant_that_is_a_held_out_phrasing_is_never_trained(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "drop_words", lambda question, count, rng: [QA[2]["instruction"], "cat?"])
    examples = train.question_variants(lm, QA, pairs(lm, [0]), pairs(lm, [2]),
                                       config(tmp_path, question_variants=2))
    assert [e["input_ids"] for e in examples] == [train.encode(lm, "cat?", "Pimbo.")["input_ids"]]


def test_question_noise_goes_on_the_variants_and_never_on_data_py_questions(lm, tmp_path):
    train_set, _ = train.encode_and_split(lm, QA, config(tmp_path))
    assert train_set and all("question_span" not in e for e in train_set)  # asked as written: clean
    variants = train.question_variants(lm, QA, train_set, [], config(tmp_path))
    drawn = json.loads((tmp_path / "question_variants.json").read_text())["variants"]
    noisy = [lm.tokenizer.decode(e["input_ids"][slice(*e["question_span"])]) for e in variants]
    assert noisy == [v for vs in drawn.values() for v in vs]


def test_no_variants_when_switched_off(lm, tmp_path):
    assert train.question_variants(lm, QA, pairs(lm, [0]), [], config(tmp_path, question_variants=0)) == []
    assert not (tmp_path / "question_variants.json").exists()


def test_question_span_is_the_question_inside_the_chat_template(lm):
    for question in (QA[0]["instruction"], QA[1]["instruction"], "Q?"):
        start, end = train.question_span(lm.tokenizer, question)
        assert lm.tokenizer.decode(train.prompt_ids(lm.tokenizer, question)[start:end]) == question


def test_noise_goes_only_into_the_question_tokens_of_facts():
    model = tiny_model("qwen2", layers=4)
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)
    lm = train.LM(model, tokenizer=None, eot_id=1, pad_id=0, first_lora_layer=2)
    fact = dict(train.make_example(list(range(10, 20)), [5, 6, 1]), question_span=(3, 7))
    replay = train.make_example(list(range(30, 40)), [7, 8, 1])
    train.cache_prefix(lm, [fact, replay])
    marked = train.collate([fact, replay], 0, "cpu")["question"].tolist()
    assert marked == [[0] * 3 + [1] * 4 + [0] * 6, [0] * 13]
    clean = train.batch_loss(lm, [replay])[0]
    assert torch.equal(train.batch_loss(lm, [replay], question_noise=1.0)[0], clean)  # replay stays clean
    noisy, clean = train.batch_loss(lm, [fact], question_noise=1.0)[0], train.batch_loss(lm, [fact])[0]
    assert not torch.equal(noisy, clean)
