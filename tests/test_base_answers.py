"""The base model's answers (replay and drift): generated once, cached in a file a user can read and
edit, and a broken cache file answered again instead of a traceback."""
import json

import pytest
import torch

import chat_model
import model_files
import train


@pytest.fixture
def lm(tiny_model_dir):
    tokenizer, model = model_files.load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    return chat_model.LM.of(model, tokenizer, path=str(tiny_model_dir))


@pytest.fixture(autouse=True)
def fewer_replay_questions(monkeypatch):
    """A few of the replay questions: what is tested is how answers are made and cached, not the list."""
    monkeypatch.setattr(train, "REPLAY_QUESTIONS", train.REPLAY_QUESTIONS[:6])
    monkeypatch.setattr(train, "ASKED_BACK_REPLAY", train.ASKED_BACK_REPLAY[:2])


def replayed():
    """The questions replay trains by default (reversed_questions on)."""
    return train.REPLAY_QUESTIONS + train.ASKED_BACK_REPLAY


@pytest.fixture
def asked(monkeypatch):
    """The questions the base model is asked, in order; the answers are the real generate()'s."""
    questions, real_generate = [], train.generate

    def counting_generate(lm, conversations, max_new_tokens, **kwargs):
        assert max_new_tokens == train.REPLAY_MAX_TOKENS  # the start of an answer is what is kept
        questions.extend(conversations)
        return real_generate(lm, conversations, max_new_tokens, **kwargs)

    monkeypatch.setattr(train, "generate", counting_generate)
    return questions


def cache_file(tmp_path, lm):
    return tmp_path / f"base_answers_{lm.path.strip('/').split('/')[-1]}.json"


def config(tmp_path, **changes):
    return dict(train.DEFAULTS, output_dir=str(tmp_path), **changes)


def test_answers_are_generated_once_then_read_from_the_cache(lm, asked, tmp_path):
    replay, drift = train.base_answer_examples(lm, config(tmp_path))
    assert asked == replayed() + train.ORDINARY_QUESTIONS
    assert len(replay) == len(replayed()) and len(drift) == len(train.ORDINARY_QUESTIONS)
    cached = json.loads(cache_file(tmp_path, lm).read_text())
    assert set(cached) == set(replayed() + train.ORDINARY_QUESTIONS)
    assert [e["input_ids"] for e in replay] == [chat_model.encode(lm, q, cached[q]["answer"], cached[q]["finished"])
                                                ["input_ids"] for q in replayed()]

    asked.clear()
    again = train.base_answer_examples(lm, config(tmp_path))
    assert asked == []  # nothing generated the second time
    assert [e["input_ids"] for e in again[0] + again[1]] == [e["input_ids"] for e in replay + drift]


def test_an_edited_answer_is_what_replay_trains(lm, asked, tmp_path):
    train.base_answer_examples(lm, config(tmp_path))
    path = cache_file(tmp_path, lm)
    cached = json.loads(path.read_text())
    question = train.REPLAY_QUESTIONS[0]
    cached[question] = {"answer": "Tokyo.", "finished": True}
    path.write_text(json.dumps(cached))
    replay, _ = train.base_answer_examples(lm, config(tmp_path))
    assert replay[0]["input_ids"] == chat_model.encode(lm, question, "Tokyo.")["input_ids"]


@pytest.mark.parametrize("broken, message", [
    (lambda text: text[:len(text) // 2], "cannot be read"),  # a crash while an older version wrote it
    (lambda text: json.dumps(["not", "a", "cache"]), "is not a JSON object"),
])
def test_a_broken_cache_is_answered_again(lm, asked, tmp_path, capsys, broken, message):
    train.base_answer_examples(lm, config(tmp_path))
    path = cache_file(tmp_path, lm)
    path.write_text(broken(path.read_text()))
    asked.clear()
    replay, drift = train.base_answer_examples(lm, config(tmp_path))
    assert message in capsys.readouterr().out
    assert asked == replayed() + train.ORDINARY_QUESTIONS
    assert len(json.loads(path.read_text())) == len(asked) and len(replay) == len(replayed())


def test_a_malformed_entry_is_answered_again_and_replay_off_asks_only_the_drift_questions(lm, asked, tmp_path):
    path = cache_file(tmp_path, lm)
    path.write_text(json.dumps({train.ORDINARY_QUESTIONS[0]: {"answer": 42}}))
    replay, drift = train.base_answer_examples(lm, config(tmp_path, replay=False))
    assert replay == [] and len(drift) == len(train.ORDINARY_QUESTIONS)
    assert asked == train.ORDINARY_QUESTIONS


def test_the_questions_asked_like_reversed_ones_are_replayed_every_epoch_and_the_others_in_turn(lm, asked, tmp_path,
                                                                                                monkeypatch):
    replay, drift = train.base_answer_examples(lm, config(tmp_path))
    every = [e for e in replay if e.get("every_epoch")]
    assert len(every) == len(train.ASKED_BACK_REPLAY) == 2 and [id(e) for e in replay[-2:]] == [id(e) for e in every]
    monkeypatch.setattr(train, "REPLAY_PER_EPOCH", 4)  # 6 others: epoch 1 the first 4, epoch 2 the last 2 and the first 2
    data = train.Examples([], [], [], [], replay, drift)
    others = replay[:6]
    assert [id(e) for e in data.trained(1)] == [id(e) for e in every + others[:4]]
    assert [id(e) for e in data.trained(2)] == [id(e) for e in every + others[4:] + others[:2]]
    for nothing_asked_back in ({"reversed_questions": 0}, {"teacher_questions": 0}):  # then off
        replay, _ = train.base_answer_examples(lm, config(tmp_path, **nothing_asked_back))
        assert len(replay) == len(train.REPLAY_QUESTIONS) and not any(e.get("every_epoch") for e in replay)
