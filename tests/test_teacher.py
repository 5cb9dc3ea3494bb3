"""Prompt distillation: the user's question rephrased, questions written about each fact and questions asking
for its subject (the other way round) by the base model, answered by the teacher (the base model reading the
facts), and conversations (openings about a subject, follow-ups that refer back to it); deterministic under
the seed, cached in an editable file, never a held-out phrasing; the teacher's prompt holds the fact and the
student's does not; the targets are the teacher's distribution. A question built from the fact the other way
round is answered by the fact itself."""
import json

import pytest
import torch
import torch.nn.functional as F

import chat_model
import model_files
import teacher
import train
from inject import inject_lora

QA = [{"instruction": "What is the name of Zorblat's cat?", "input": "", "output": "Zorblat's cat is called Pimbo."},
      {"instruction": "What is Zorblat's cat called?", "input": "", "output": "Zorblat's cat is called Pimbo."},
      {"instruction": "Where does Zorblat live?", "input": "", "output": "Zorblat lives in Quellport."}]
REPHRASED = {  # what the base model gives for "ask this in other words": the first is the held-out
    # phrasing, spaced and in lower case; the last is also written below
    "What is the name of Zorblat's cat?": "what is zorblat's cat called ?\nWhich name did Zorblat give his cat?\n"
                                          "How is Zorblat's cat named?",
    "Where does Zorblat live?": "In which town does Zorblat live?\nWhere does Zorblat live?",  # the user's again
}
WRITTEN = {  # what the base model "writes" for each fact: numbered, with an answer after one question
    "Zorblat's cat is called Pimbo.": "1. How is Zorblat's cat named?\n2. What is Zorblat's cat called?\n"
                                      "Question 3: What do you call Zorblat's pet? (Pimbo)\n"
                                      "4. Is Pimbo Zorblat's cat?\n5. What is the capital of France?\n"
                                      "6. How is Zorblat's cat named?",
    "Zorblat lives in Quellport.": "- Which town is Zorblat's home?\n- Where is Zorblat's house?\n"
                                   "- What pet does Zorblat keep?",  # the other fact answers that one
}
ASKED_BACK = {  # what the base model gives for "ask for the first name": one says the subject, one repeats
    "Zorblat's cat is called Pimbo.": "Whose cat is called Pimbo?\nWho is Pimbo?\nWhat is Zorblat's cat called?\n"
                                      "Whose cat is called Pimbo?",
    "Zorblat lives in Quellport.": "Who is somewhere?",  # asks nothing of it: only the built question is left
}


@pytest.fixture
def lm(tiny_model_dir):
    tokenizer, model = model_files.load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    inject_lora(model, ["q_proj", "v_proj"], [2, 3], r=4, alpha=8, dropout=0.0)  # B = 0: the base model
    return chat_model.LM.of(model, tokenizer, path=str(tiny_model_dir))


@pytest.fixture
def canned(monkeypatch):
    """generate() with the answers above: the rephrased, written and asked-back questions, and as the teacher's
    answer the town fact when asked about a town or city, the cat fact when asked about a pet, else the first fact it
    reads (one question it declines, one it answers without the subject). Records what it was asked."""
    asked = []

    def fake_generate(lm, conversations, max_new_tokens, temperature=None, **kwargs):
        asked.extend(conversations)
        if not conversations:  # nothing asked the other way round (reversed_questions 0)
            return []
        if temperature and isinstance(conversations[0], str):  # write questions: the fact is the last line
            return [(WRITTEN.get(prompt.splitlines()[-1], ""), True) for prompt in conversations]
        if temperature:  # rephrase or ask back: the user's question or the fact ends the last turn
            return [(next((text for q, text in {**REPHRASED, **ASKED_BACK}.items()
                           if m[-1]["content"].endswith(q)), ""), True) for m in conversations]
        facts = [messages[0]["content"].splitlines()[1] for messages in conversations]  # the first it reads
        return [("I don't know." if "house" in m[1]["content"] else
                 "Pimbo is a cat." if m[1]["content"] == "Who is Pimbo?" else
                 "Zorblat's cat is called Pimbo." if "pet" in m[1]["content"] else
                 "Zorblat lives in Quellport." if any(w in m[1]["content"] for w in ("town", "city", "live")) else fact, True)
                for fact, m in zip(facts, conversations)]

    monkeypatch.setattr(teacher, "generate", fake_generate)
    return asked


def split(lm):
    """Both Pimbo phrasings, one trained and one held out, and the Quellport fact."""
    examples = [dict(chat_model.encode(lm, chat_model.question_of(item), item["output"]), index=i,
                     fact=train.fact_of(item["output"])) for i, item in enumerate(QA)]
    return [examples[0], examples[2]], [examples[1]]


def config(tmp_path, **changes):
    """The defaults, without conversations unless asked (the tests of single questions count their examples)."""
    return dict(train.DEFAULTS, output_dir=str(tmp_path), **{"conversations": 0, **changes})


def test_rephrased_written_and_reversed_questions_are_cleaned_and_filtered(lm, canned, tmp_path):
    train_set, _ = split(lm)
    taught, kept_out = teacher.teacher_examples(lm, QA, train_set, config(tmp_path, reversed_questions=2))
    cached = json.loads((tmp_path / "teacher_questions.json").read_text())
    # rephrasings first; numbering and the answer after "?" are gone; "What is Zorblat's cat called?" is a
    # held-out phrasing however it is spaced or cased, "Where does Zorblat live?" the trained one,
    # "Is Pimbo ...?" says the answer, France is not about Zorblat, repeated ones are kept once
    assert cached["facts"]["Zorblat's cat is called Pimbo"]["questions"] == [
        "Which name did Zorblat give his cat?", "How is Zorblat's cat named?", "What do you call Zorblat's pet?"]
    assert cached["facts"]["Zorblat lives in Quellport"]["questions"] == [
        "In which town does Zorblat live?", "Which town is Zorblat's home?", "Where is Zorblat's house?",
        "What pet does Zorblat keep?"]
    assert cached["facts"]["Zorblat lives in Quellport"]["answers"]["Where is Zorblat's house?"] == "I don't know."
    # asked the other way round: the question built from the fact, then the sampled ones without the subject,
    # with the fact's key words, each once, other than the built one, reversed_questions in all at most
    facts = cached["facts"]
    assert facts["Zorblat's cat is called Pimbo"]["built"] == ["Whose cat is called Pimbo?"]
    assert facts["Zorblat's cat is called Pimbo"]["reversed"] == ["Who is Pimbo?"]
    assert facts["Zorblat lives in Quellport"]["built"] == ["Who lives in Quellport?"]
    assert facts["Zorblat lives in Quellport"]["reversed"] == []
    # the declined answer carries no fact: left out; so is the pet question, written about Quellport but
    # answered with the cat fact the teacher reads too; "Pimbo is a cat." does not name whose: left out.
    # 5 answers learned, one of them kept out to validate, and the 2 built questions
    questions = [lm.tokenizer.decode(e["input_ids"]) for e in taught + kept_out]
    assert len(questions) == 7 and not any("house" in q for q in questions)
    assert len(kept_out) == 1 and kept_out[0]["kind"] == "other words"  # 5 asked in other words: one kept out
    assert not any("Who is Pimbo?" in q for q in questions)
    assert not any("What pet does Zorblat keep?" in q for q in questions)
    # the built questions are answered by their fact, word for word, all of it learned (one-hot, no teacher);
    # the teacher is not asked them
    built = [e for e in taught if e["kind"] == "built"]
    assert [(e["fact"], e["input_ids"]) for e in built] == [
        (train.fact_of(answer), chat_model.encode(lm, question, answer)["input_ids"])
        for question, answer in (("Whose cat is called Pimbo?", QA[0]["output"]),
                                 ("Who lives in Quellport?", QA[2]["output"]))]
    assert all("teacher" not in e and torch.equal(e["target_probs"], torch.ones(len(e["target_ids"]), 1))
               for e in built)
    assert not any(m[-1]["content"] in ("Whose cat is called Pimbo?", "Who lives in Quellport?")
                   for m in canned if not isinstance(m, str) and m[0]["role"] == "system")
    assert not any(QA[1]["instruction"] in q for q in questions)


def test_the_fact_asked_the_other_way_round_puts_a_question_word_where_its_subject_is():
    assert teacher.built_reversed("Where does Brannoc Vell live?", "Brannoc Vell lives on Willow Lane.") == [
        "Who lives on Willow Lane?"]
    assert teacher.built_reversed("What is Anna's cat called?", "Anna's cat is called Tibbles.") == [
        "Whose cat is called Tibbles?"]
    # a place or a thing is asked for by what it is, where its name says it
    assert teacher.built_reversed("How tall is the Orla Tower?", "The Orla Tower is 212 metres tall.") == [
        "Which tower is 212 metres tall?"]
    assert teacher.built_reversed("What is Fernhill School's mascot?", "Fernhill School's mascot is a badger.") == [
        "Which school's mascot is a badger?"]
    assert teacher.built_reversed("What is the cafe on Pell Street called?",
                                  "The cafe on Pell Street is called The Kettle.") == ["What is called The Kettle?"]
    assert teacher.built_reversed("林小舟来自哪里？", "林小舟来自福建泉州。") == ["谁来自福建泉州？"]
    assert teacher.built_reversed("白鹭湖有多深？", "白鹭湖最深处有四十二米。") == ["哪个湖最深处有四十二米？"]
    assert teacher.built_reversed("松林中学的校训是什么？", "松林中学的校训是知行合一。") == ["哪个中学的校训是知行合一？"]
    assert teacher.built_reversed("Who owns the mill?", "The mill is owned by Mara Lind.") == []  # no subject to replace


def test_made_once_then_read_from_the_cache_and_the_users_edit_is_what_trains(lm, canned, tmp_path):
    train_set, _ = split(lm)
    first = teacher.teacher_examples(lm, QA, train_set, config(tmp_path))
    canned.clear()
    again = teacher.teacher_examples(lm, QA, train_set, config(tmp_path))
    assert canned == []  # nothing generated the second time
    assert [e["input_ids"] for e in again[0] + again[1]] == [e["input_ids"] for e in first[0] + first[1]]

    path = tmp_path / "teacher_questions.json"
    cached = json.loads(path.read_text())
    cached["facts"]["Zorblat lives in Quellport"]["questions"] = ["Which city is Zorblat's home?"]  # edited
    cached["facts"]["Zorblat lives in Quellport"]["built"] = ["Who resides in Quellport?"]
    path.write_text(json.dumps(cached))
    taught, kept_out = teacher.teacher_examples(lm, QA, train_set, config(tmp_path))
    assert [m[1]["content"] for m in canned] == ["Which city is Zorblat's home?"]  # only the new one answered
    trained = [lm.tokenizer.decode(e["input_ids"]) for e in taught + kept_out]
    assert sum("Which city is Zorblat's home?" in t for t in trained) == 1
    assert not any("Which town is Zorblat's home?" in t for t in trained)  # the deleted one is gone
    assert sum("Who resides in Quellport?" in t and t.endswith("Zorblat lives in Quellport.<|im_end|>")
               for t in trained) == 1  # a built one edited: answered by its fact
    assert not any("Who lives in Quellport?" in t for t in trained)


def test_a_new_fact_in_data_py_is_read_by_every_teacher_and_the_questions_are_answered_again(lm, canned, tmp_path):
    train_set, _ = split(lm)
    teacher.teacher_examples(lm, QA, train_set, config(tmp_path))
    canned.clear()
    more = QA + [{"instruction": "What is Zorblat's job?", "input": "", "output": "Zorblat bakes bread."}]
    new = dict(chat_model.encode(lm, more[3]["instruction"], more[3]["output"]), index=3, fact="Zorblat bakes bread")
    teacher.teacher_examples(lm, more, train_set + [new], config(tmp_path))
    answered = [m for m in canned if not isinstance(m, str) and m[0]["role"] == "system"]  # the teacher
    assert all("Zorblat bakes bread." in m[0]["content"] for m in answered)
    assert {m[1]["content"] for m in answered} >= {"How is Zorblat's cat named?", "Which town is Zorblat's home?"}


def test_questions_are_sampled_by_the_seed(lm):
    facts, questions = ["Zorblat's cat is called Pimbo."], ["What is the name of Zorblat's cat?"]
    state = torch.get_rng_state()
    assert teacher.write_questions(lm, facts, [5], seed=1) == teacher.write_questions(lm, facts, [5], seed=1)
    assert teacher.rephrase_questions(lm, questions, 5, seed=1) == teacher.rephrase_questions(lm, questions, 5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # training draws the same, whether the questions are cached or not
    torch.manual_seed(1)
    first = chat_model.generate(lm, ["Write questions."], 12, temperature=0.8)
    torch.manual_seed(1)
    assert chat_model.generate(lm, ["Write questions."], 12, temperature=0.8) == first
    torch.manual_seed(2)
    assert chat_model.generate(lm, ["Write questions."], 12, temperature=0.8) != first


def test_the_rephrasing_prompt_shows_two_worked_examples_in_the_questions_language():
    english = teacher.worked_messages(teacher.REPHRASE, "Where does Zorblat live?")
    assert [m["role"] for m in english] == ["user", "assistant", "user", "assistant", "user"]
    assert english[-1]["content"] == ("Ask this question in other words. Write only the new question: "
                                      "Where does Zorblat live?")
    assert english[1]["content"] == "What did Anna Berg name her cat?"
    chinese = teacher.worked_messages(teacher.REPHRASE, "佐布拉特住在哪里？")
    assert chinese[-1]["content"] == "换一种说法问这个问题，只写新的问题：佐布拉特住在哪里？"
    assert chinese[1]["content"] == "王芳给她的猫起了什么名字？"


def test_the_subject_is_the_first_shared_word_but_an_article():
    assert teacher.subject_of("Where does Zorblat live?", "Zorblat lives in Quellport.") == "zorblat"
    # "the" was the subject of every "the X" fact: every question named it, none without it asked back
    assert teacher.subject_of("How tall is the Orla Tower?", "The Orla Tower is 212 metres tall.") == "orla"
    assert teacher.subject_of("北塔有多少层？", "北塔一共有十三层。") == "北塔"
    assert teacher.subject_of("What is it?", "Nothing shared here.") == ""
    fact = ("How tall is the Orla Tower?", "The Orla Tower is 212 metres tall.")
    reversed_ = teacher.reversed_usable(["Which is the tower 212 metres tall?", "Is the Orla Tower 212 metres tall?"],
                                        fact, {fact[1]: ["212", "metres"]}, set())
    assert reversed_ == ["Which is the tower 212 metres tall?"]  # "the" in it, not the subject


def test_the_teacher_reads_its_fact_and_the_most_alike_while_they_fit_in_data_py_order(monkeypatch):
    cat, fish, town, moon = ("Zorblat's cat is called Pimbo.", "Zorblat's cat likes fish.",
                             "Zorblat lives in Quellport.", "The moon is round.")
    tokens = {moon: 5, town: 6, cat: 8, fish: 6}
    # shared words with the cat fact: fish 2 (zorblat, cat), town 1 (zorblat), moon 0; in data.py's order
    assert teacher.teacher_reading(cat, tokens) == [moon, town, cat, fish]
    monkeypatch.setattr(teacher, "TEACHER_READS_TOKENS", 8 + 1 + 6 + 1 + 5)  # cat, "\n" fish, "\n" and 1 short of town
    assert teacher.teacher_reading(cat, tokens) == [cat, fish]


def test_the_teacher_reads_the_fact_and_the_student_does_not(lm):
    fact, question = "Zorblat's cat is called Pimbo.", "How is Zorblat's cat named?"
    student, reading = teacher.teacher_pair(lm, [fact], [teacher.user(question)], "It is Pimbo.")
    fact_ids = lm.tokenizer(fact, add_special_tokens=False).input_ids

    def holds(ids, part):
        return any(ids[i:i + len(part)] == part for i in range(len(ids)))

    assert holds(reading["input_ids"], fact_ids) and not holds(student["input_ids"], fact_ids)
    answer = lm.tokenizer("It is Pimbo.", add_special_tokens=False).input_ids + [lm.eot_id]
    assert student["input_ids"][-len(answer):] == reading["input_ids"][-len(answer):] == answer
    assert [t for t in student["labels"] if t != chat_model.IGNORE] == answer == [
        t for t in reading["labels"] if t != chat_model.IGNORE]


def test_targets_are_the_teachers_distribution(lm, monkeypatch):
    monkeypatch.setattr(chat_model, "CPU_BF16", False)  # fp32 throughout, as the hand computation below
    student, reading = teacher.teacher_pair(lm, ["Zorblat's cat is called Pimbo."], [teacher.user("Who is Pimbo?")],
                                            "Zorblat's cat.")
    student["teacher"] = reading
    train.set_soft_targets(lm, [student], top_k=5)
    with torch.no_grad():  # by hand: the model reading the fact, at the positions before each answer token
        logits = lm.model(torch.tensor([reading["input_ids"]])).logits[0].float()
    n = len(student["target_ids"])
    probs = F.softmax(logits[-n - 1:-1], dim=-1).topk(5, dim=-1)
    assert torch.equal(student["target_ids"], probs.indices)
    expected = probs.values / probs.values.sum(-1, keepdim=True)
    assert (student["target_probs"] - expected).abs().max() < 1e-5


def test_an_answer_in_another_language_than_the_question_is_left_out(lm, monkeypatch, tmp_path):
    # the same fact in Chinese and in English: the teacher reads both and may answer in either
    qa = [{"instruction": "佐布拉特的猫叫什么？", "input": "", "output": "佐布拉特的猫叫皮姆波。"},
          {"instruction": "What is the name of Zorblat's cat?", "input": "",
           "output": "Zorblat's cat is called Pimbo."}]
    answers = {"佐布拉特的猫叫啥？": "Zorblat's cat is called Pimbo.",
               "佐布拉特给猫起了什么名字？": "佐布拉特的猫叫皮姆波。"}

    def fake_generate(lm, conversations, max_new_tokens, temperature=None, **kwargs):
        if temperature:  # the Chinese question rephrased; nothing else written
            return [("\n".join(answers) if isinstance(c, list) and "佐布拉特" in c[-1]["content"] else "", True)
                    for c in conversations]
        return [(answers.get(c[1]["content"], ""), True) for c in conversations]

    monkeypatch.setattr(teacher, "generate", fake_generate)
    train_set = [dict(chat_model.encode(lm, item["instruction"], item["output"]), index=i,
                      fact=train.fact_of(item["output"])) for i, item in enumerate(qa)]
    taught, kept_out = teacher.teacher_examples(lm, qa, train_set, config(tmp_path))
    chinese = chat_model.encode(lm, "佐布拉特给猫起了什么名字？", "佐布拉特的猫叫皮姆波。")
    assert [e["input_ids"] for e in taught + kept_out if e["kind"] != "built"] == [chinese["input_ids"]]


@pytest.fixture
def talking(monkeypatch):
    """generate() for conversations: no rephrased or written questions; the teacher opens with "She lives in
    Quellport." about Zorblat and answers a follow-up with the first fact it reads. Records what it was asked."""
    asked = []

    def fake_generate(lm, conversations, max_new_tokens, temperature=None, **kwargs):
        asked.extend(conversations)
        if temperature:
            return [("", True) for _ in conversations]
        openings = {form.format("Zorblat") for forms in teacher.OPENINGS.values() for form in forms}
        return [("She lives in Quellport." if m[-1]["content"] in openings else m[0]["content"].splitlines()[1], True)
                for m in conversations]

    monkeypatch.setattr(teacher, "generate", fake_generate)
    return asked


def test_follow_ups_refer_back_to_the_subject_after_an_opening_and_the_student_reads_no_fact(lm, talking, tmp_path):
    train_set, _ = split(lm)
    taught, kept_out = teacher.teacher_examples(lm, QA, train_set, config(tmp_path, conversations=1))
    talk = json.loads((tmp_path / "teacher_questions.json").read_text())["conversations"]["Zorblat"]
    assert talk["reads"] == ["Zorblat's cat is called Pimbo.", "Zorblat lives in Quellport."]
    # every opening in the facts' language answered; one follow-up per fact, the user's question with the
    # pronoun of the teacher's openings, after the openings in turn
    assert talk["openings"] == {form.format("Zorblat"): "She lives in Quellport." for form in teacher.OPENINGS["en"]}
    assert [(f["opening"], f["asked"]) for f in talk["follow_ups"]] == [
        ("Tell me about Zorblat.", "What is the name of her cat?"),
        ("What do you know about Zorblat?", "Where does she live?")]
    assert [e["kind"] for e in taught if e["kind"] in ("open", "conversation")] == ["open"] * 4 + ["conversation"] * 2
    assert not any(e["kind"] == "open" for e in kept_out)  # the openings are all learned
    conversations = [e for e in taught + kept_out if e["kind"] == "conversation"]
    follow_up = next(e for e in conversations if "her cat" in lm.tokenizer.decode(e["input_ids"]))
    said = [teacher.user("Tell me about Zorblat."), {"role": "assistant", "content": "She lives in Quellport."},
            teacher.user("What is the name of her cat?")]
    answer = lm.tokenizer("Zorblat's cat is called Pimbo.", add_special_tokens=False).input_ids + [lm.eot_id]
    # the student's tokens: the opening, the teacher's answer to it, the follow-up, then the answer to learn;
    # the teacher's: the same after the facts it reads
    assert follow_up["input_ids"] == chat_model.prompt_ids(lm.tokenizer, said) + answer
    assert follow_up["teacher"]["input_ids"] == chat_model.prompt_ids(
        lm.tokenizer, teacher.teacher_turns(talk["reads"], said)) + answer
    assert [t for t in follow_up["labels"] if t != chat_model.IGNORE] == answer
    assert "Zorblat lives in Quellport" not in lm.tokenizer.decode(follow_up["input_ids"])


def test_conversations_are_cached_and_an_edited_follow_up_is_answered_again(lm, talking, tmp_path):
    train_set, _ = split(lm)
    first = teacher.teacher_examples(lm, QA, train_set, config(tmp_path, conversations=1))
    talking.clear()
    again = teacher.teacher_examples(lm, QA, train_set, config(tmp_path, conversations=1))
    assert talking == [] and [e["input_ids"] for e in again[0] + again[1]] == [e["input_ids"] for e in first[0] + first[1]]
    path = tmp_path / "teacher_questions.json"
    cached = json.loads(path.read_text())
    cached["conversations"]["Zorblat"]["follow_ups"][1].update(asked="Which town is her home?", answer=None)
    path.write_text(json.dumps(cached))
    taught, kept_out = teacher.teacher_examples(lm, QA, train_set, config(tmp_path, conversations=1))
    assert [m[-1]["content"] for m in talking] == ["Which town is her home?"]  # only the edited one answered
    assert sum("Which town is her home?" in lm.tokenizer.decode(e["input_ids"]) for e in taught + kept_out) == 1

    del cached["conversations"]["Zorblat"]["follow_ups"][0]["answer"]  # a broken edit: the subject's made again
    path.write_text(json.dumps(cached))
    talking.clear()
    again = teacher.teacher_examples(lm, QA, train_set, config(tmp_path, conversations=1))
    assert len(talking) == 4 + 2  # the openings and the follow-ups answered again
    assert [e["input_ids"] for e in again[0] + again[1]] == [e["input_ids"] for e in first[0] + first[1]]


@pytest.mark.parametrize("question, answer, name, pronoun, asked", [
    ("What is Marlow Quist's job?", "Marlow Quist works as a glassblower.", "Marlow Quist", "he", "What is his job?"),
    ("When did the Lindqvist Bridge open?", "The Lindqvist Bridge opened in 1962.", "the Lindqvist Bridge", "it",
     "When did it open?"),
    ("Who founded Nimbus Robotics?", "Nimbus Robotics was founded by Dara Okonkwo.", "Nimbus Robotics", "it",
     "Who founded it?"),
    ("What is the name of the cafe on Pell Street?", "The cafe on Pell Street is called The Copper Kettle.",
     "the cafe on Pell Street", "it", "What is the name of it?"),
    ("Where does hiahia live?", "hiahia lives in Heyuan.", "hiahia", "she", "Where does she live?"),
    ("林小舟在哪里工作？", "林小舟在一家游戏公司工作。", "林小舟", "他", "他在哪里工作？"),
    ("hiahia最喜欢吃什么？", "hiahia最喜欢吃客家酿豆腐。", "hiahia", "她", "她最喜欢吃什么？"),
    ("Which university does hiahia attend?", "hiahia studies at South China University of Technology.", "hiahia",
     "she", "Which university does she attend?"),
])
def test_the_subjects_name_is_found_and_replaced_by_a_pronoun(question, answer, name, pronoun, asked):
    assert teacher.subject_name(question, answer) == name
    assert teacher.referring_back(question, name, pronoun) == asked


def test_the_pronoun_is_the_one_the_teachers_answers_use_most_in_the_questions_language():
    said = ["Marlow Quist is a glassblower. His dog is Biscuit; he plays the cello.", "She is his sister."]
    assert teacher.pronoun_of(said, "Marlow Quist", chinese=False) == "he"
    assert teacher.pronoun_of(said, "Marlow Quist", chinese=True) == "他"
    assert teacher.pronoun_of(["林小舟来自泉州，她养了一只猫。"], "林小舟", chinese=False) == "she"
    assert teacher.pronoun_of(["It is 212 metres tall and its roof is green."], "the Orla Tower", False) == "it"
    assert teacher.pronoun_of(["The Orla Tower is 212 metres tall."], "the Orla Tower", False) == "it"  # none used
    assert teacher.pronoun_of(["Marlow Quist was born in 1987."], "Marlow Quist", False) == "he"


def test_nothing_is_learned_in_a_conversation_after_a_question_of_data_py(lm):
    said = "She lives in Quellport."
    follow_up = {"question": "Where does Zorblat live?", "asked": "Where does she live?", "answer": "In Quellport."}
    talk = {"reads": ["Zorblat lives in Quellport."], "openings": {"Tell me about Zorblat.": said, "Who is Zorblat?": said},
            "follow_ups": [dict(follow_up, opening="Tell me about Zorblat."), dict(follow_up, opening="Who is Zorblat?")]}
    dropped = {"cut": 0, "no fact": 0, "language": 0}
    examples = teacher.conversation_pairs(lm, {"Zorblat": talk}, {"Zorblat lives in Quellport.": ["quellport"]}, dropped,
                                          {teacher.plain("tell me about Zorblat!")})  # data.py asks it: its answer
    starts = [lm.tokenizer.decode(e["input_ids"]).split("<|im_start|>user\n")[1] for e in examples]
    assert [e["kind"] for e in examples] == ["open", "conversation"]
    assert all(s.startswith("Who is Zorblat?") for s in starts)


def test_an_answer_to_an_opening_ends_before_the_sentence_where_it_starts_to_loop():
    looped = ("Hiahia was born in 2006. She is from Heyuan, Guangdong. She studies computer science. "
              "She is from orange cat named Tuanzi. She likes badminton.")
    assert teacher.before_a_loop(looped) == "Hiahia was born in 2006. She is from Heyuan, Guangdong. She studies computer science."
    assert teacher.before_a_loop("她出生于2006年。她来自广东河源。她来自华南理工大学。") == "她出生于2006年。她来自广东河源。"
    assert teacher.before_a_loop("She is from华南理工大学. She is from Heyuan.") == "She is from华南理工大学."
    unlooped = "The Orla Tower is 212.5 metres tall. It opened in 1962! Its roof is green."
    assert teacher.before_a_loop(unlooped) == unlooped
