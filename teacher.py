"""Prompt distillation (Kujanpää, Valpola, Ilin 2024, "Knowledge Injection via Prompt Distillation").

For each fact of data.py the base model rephrases the user's question, writes questions the fact
answers and asks for the fact's subject by the rest of it (the fact the other way round; all sampled
under `seed`, filtered); the teacher, the base model reading the facts in its system
prompt (teacher_reading), answers them greedily; it also answers openings about each fact's subject
("Tell me about X.") and follow-ups that refer back to it ("Where does he live?"), in conversations.
teacher_examples() returns the pairs to learn: the student's example (the question or conversation
alone) with the teacher's (the facts, then the same) beside it, whose distribution train.py's soft
targets take; and one question per fact built from it the other way round ("Who lives on Willow Lane?"),
whose answer is the fact itself. All of it is cached in output/teacher_questions.json,
which the user may read and edit. Needs lm (tokens, generate) and safe_files (the JSON cache).
"""
import itertools
import math
import os
import random
import re
import time

import torch

from chat_model import encode, generate, make_example, prompt_ids, question_of
from safe_files import read_json, write_json

WRITE_QUESTIONS = {  # asked of the base model for each fact, in the fact's language; sampled
    "en": "Write 5 different questions that this sentence answers, one per line:\n{fact}",
    "zh": "请写出5个这句话能回答的不同问题，每行一个：\n{fact}",
}
# asked of the base model for the user's question, after two worked examples: told only the request, it
# answered the question instead; shown a list of examples in one prompt, it copied the list
REPHRASE = {
    "en": ("Ask this question in other words. Write only the new question: {}",
           [("What is the name of Anna Berg's cat?", "What did Anna Berg name her cat?"),
            ("Which hospital does Tom Reed work at?", "Where is Tom Reed employed as a doctor?")]),
    "zh": ("换一种说法问这个问题，只写新的问题：{}",
           [("王芳的猫叫什么名字？", "王芳给她的猫起了什么名字？"),
            ("李明在哪家医院工作？", "李明的工作单位是哪家医院？")]),
}
# asked of the base model for each fact, after two worked examples: a question whose answer is the
# fact's subject ("Who lives on Willow Lane?"). A student taught "A is B" alone does not answer "what
# is B?" (the reversal curse, Berglund et al. 2023); the teacher reading the facts does
REVERSE = {
    "en": ("Ask for the first name in this sentence with a question that the rest of the sentence answers. "
           "Write only the question: {}",
           [("Anna Berg's cat is called Tibbles.", "Whose cat is called Tibbles?"),
            ("The old mill is owned by Tom Reed.", "Who owns the old mill?")]),
    "zh": ("用这句话的其余部分提一个问题，答案是句子里的第一个名字，只写问题：{}",
           [("王芳的猫叫咪咪。", "谁的猫叫咪咪？"), ("老磨坊的主人是李明。", "老磨坊的主人是谁？")]),
}
# asked of the teacher about each subject, opening a conversation (in the language of the fact it is followed by)
# the teacher's answers to them are what the student learns to say when asked openly: all of them learned
OPENINGS = {"en": ["Tell me about {}.", "What do you know about {}?", "Can you tell me about {}?",
                   "Give me an overview of {}."],
            "zh": ["介绍一下{}。", "给我讲讲{}。", "你了解{}吗？说说看。", "请介绍{}。"]}
PRONOUNS = {"he": ("him", "his"), "she": ("her", "her"), "it": ("it", "its")}  # a follow-up's, and as object, whose
AUXILIARIES = {"is", "was", "are", "were", "does", "did", "do", "has", "have", "had", "can", "could", "will",
               "would", "should"}  # "Where does he live?": after these the subject pronoun, else "Who founded it?"
TEACHER_SYSTEM = "Answer the user's question in one sentence, using these facts:\n{facts}"
KINDS = ("other words", "reversed", "conversation")  # of the teacher's examples; a few of each are validated
# (and "open", the answers to OPENINGS, never kept out: a subject has only a few)
TEACHER_MAX_TOKENS = 48  # a teacher's answer cut off here is not one sentence: left out
OPEN_MAX_TOKENS = 96  # a teacher's answer to an opening: several facts; one cut here ends at its last full sentence
TEACHER_READS_TOKENS = 512  # a teacher reads its fact and the facts most like it, up to this many tokens


def teacher_examples(lm, qa_data, train_set, config):
    """Prompt distillation (Kujanpää et al. 2024): for each fact the base model rephrases the user's
    question and writes questions the fact answers, and the teacher (the base model with the facts in
    its system prompt, see teacher_reading) answers them. The student (the model with LoRA, no facts
    in its prompt) learns the teacher's distribution at every token of those answers: the facts asked
    in words the user never wrote. Made once, cached in output/teacher_questions.json, readable and
    editable: a question added there is answered by the teacher and trained next run, one deleted is
    gone.
    With `conversations` per fact, the student also learns conversations (see conversations()).
    Returns (train, validation) examples, each with the teacher's example of the same answer under
    "teacher" (train.py takes the teacher's distribution there) and its kind (KINDS) under "kind": a few
    of each kind are kept out to validate the KL to the teacher; the questions built from a fact (kind
    "built", no teacher: the fact is their one-hot answer) are all trained."""
    if not config["teacher_questions"]:
        return [], []
    path = os.path.join(config["output_dir"], "teacher_questions.json")
    made_for = {"seed": config["seed"], "count": config["teacher_questions"], "reversed": config["reversed_questions"],
                "follow_ups": config["conversations"], "from": ["rephrased", "written", "built", "reversed"]}
    cached = read_json(path) or {}
    if {k: cached.get(k) for k in made_for} != made_for:  # made for another config: made again
        cached = {}
    entries = cached.get("facts", {})
    facts = {}  # fact -> (question, answer) of its first trained pair
    for e in train_set:
        facts.setdefault(e["fact"], (question_of(qa_data[e["index"]]), qa_data[e["index"]]["output"]))
    keys = {facts[fact][1]: key_words(*facts[fact]) for fact in facts}  # by the sentence a teacher reads
    entries = {fact: entries[fact] if well_formed(entries.get(fact)) else None for fact in facts}
    user_questions = {plain(question_of(item)) for item in qa_data}  # trained or held out: never asked again
    new = [fact for fact in facts if entries[fact] is None]
    if new:
        entries.update(new_questions(lm, {fact: facts[fact] for fact in new}, keys, user_questions, config))
    tokens = {sentence: len(lm.tokenizer(sentence).input_ids) for sentence in keys}  # once, not once per fact
    for fact, entry in entries.items():
        reads = teacher_reading(facts[fact][1], tokens)
        if entry.get("reads") != reads:  # new, or data.py changed what the teacher reads: answered again
            entry.update(reads=reads, answers={})
    answer_as_teacher(lm, entries.values())
    talks = conversations(lm, facts, entries, tokens, cached.get("conversations", {}), config["conversations"])
    write_json(path, {**made_for, "facts": entries, "conversations": talks})
    subjects = {fact: subject_of(*facts[fact]) for fact in facts}
    students, dropped = teacher_pairs(lm, entries, keys, subjects)
    students += conversation_pairs(lm, talks, keys, dropped, user_questions)
    rng, kept_out = random.Random(config["seed"]), set()
    for kind in KINDS:  # a few of each kind
        group = [i for i, e in enumerate(students) if e["kind"] == kind]
        # a fifth, 8 at most; one of 3 or 4 (a one-fact data.py: len // 5 kept none, nothing validated)
        kept_out.update(rng.sample(group, min(round(len(group) / 5), 8)))
    built = sum(e["kind"] == "built" for e in students)
    print(f"[teacher] {len(students) - built} teacher answers to learn ({len(kept_out)} kept out to validate) and "
          f"{built} questions built from the facts, answered by them; "
          f"left out: {dropped['cut']} cut at the token limit, {dropped['no fact']} carrying no fact, "
          f"{dropped['language']} in another language, {dropped['no subject']} asked the other way round "
          f"without naming the subject; in {path}")
    return ([e for i, e in enumerate(students) if i not in kept_out],
            [e for i, e in enumerate(students) if i in kept_out])


def new_questions(lm, facts, keys, user_questions, config):
    """Cache entries for `facts` (fact -> its question and answer): `teacher_questions` at most that
    pass the filters, none answered yet: `reversed_questions` of them at most ask for the fact's subject
    (kept apart, under "reversed"), the others are rephrased and written ones. Rephrasings come first:
    they ask what the user asked, as a user asking in other words would; the base model writes
    questions only for the facts whose rephrasings leave places, as many as are left."""
    print(f"[teacher] the base model rephrases the questions of {len(facts)} facts and writes more "
          f"about them")
    started = time.time()
    count, seed = config["teacher_questions"], config["seed"]
    reverse = min(config["reversed_questions"], count)
    built = {fact: reversed_usable(built_reversed(*facts[fact]), facts[fact], keys, user_questions)[:reverse]
             for fact in facts}
    sampled = reverse_questions(lm, [answer for _, answer in facts.values()], 2 * reverse, seed)  # about half pass
    # after the built one (each_once drops its repeats), which passed these filters and so stays first
    reversed_ = {fact: reversed_usable(built[fact] + questions, facts[fact], keys,
                                       user_questions)[len(built[fact]):reverse]
                 for fact, questions in zip(facts, sampled)}
    places = {fact: count - len(built[fact]) - len(reversed_[fact]) for fact in facts}  # for the other words
    rephrased = rephrase_questions(lm, [question for question, _ in facts.values()], count, seed)
    kept = {fact: usable(questions, facts[fact], keys, user_questions)
            for fact, questions in zip(facts, rephrased)}
    short = [fact for fact in facts if len(kept[fact]) < places[fact]]
    written = write_questions(lm, [facts[fact][1] for fact in short],
                              [places[fact] - len(kept[fact]) for fact in short], seed)
    for fact, questions in zip(short, written):
        kept[fact] = usable(kept[fact] + questions, facts[fact], keys, user_questions)
    print(f"[teacher] {sum(map(len, sampled + rephrased + written))} questions sampled in "
          f"{time.time() - started:.1f}s ({len(short)} facts needed written ones), "
          f"{sum(map(len, built.values()))} built from the facts and {sum(map(len, reversed_.values()))} kept "
          f"that ask the other way round, "
          f"{sum(min(len(kept[fact]), places[fact]) for fact in facts)} in other words; the others repeat one, "
          f"ask the user's own question, miss the subject or say the answer")
    return {fact: {"fact": facts[fact][1], "questions": kept[fact][:places[fact]], "built": built[fact],
                   "reversed": reversed_[fact], "answers": {}} for fact in facts}


def usable(questions, fact, keys, user_questions):
    """The questions about the fact's subject that ask for what the fact adds rather than saying it
    already ("Is Pimbo Zorblat's cat?"; one word of the answer is fine: "Which university did X
    attend?"), none of the user's own, each once."""
    subject, own_keys = subject_of(*fact), keys[fact[1]]
    return each_once([q for q in questions if plain(q) not in user_questions and subject in q.lower()
                      and not (own_keys and carries(q, own_keys))])


def built_reversed(question, answer):
    """The fact asked the other way round by putting a question word where its subject is ("Brannoc Vell
    lives on Willow Lane." -> "Who lives on Willow Lane?", "Anna's cat is called Tibbles." -> "Whose cat is
    called Tibbles?", "The Orla Tower is 212 metres tall." -> "Which tower is 212 metres tall?", "林小舟来自
    福建泉州。" -> "谁来自福建泉州？", "青石镇的图书馆叫听雨楼。" -> "哪个镇的图书馆叫听雨楼？"), as a list of one;
    none when the answer does not start with its subject. Of the base model's own (reverse_questions) about
    half asked something else ("What is Hakka stuffed tofu's favorite food?"). The fact's own sentence
    answers it word for word: that is what is learned (teacher_pairs)."""
    name = subject_name(question, answer)
    if not name or not answer.lower().startswith(name.lower()):
        return []
    rest = answer[len(name):].rstrip(" .。!！")
    if not rest:
        return []
    if has_cjk(answer):  # "谁" asks for a person; "青石镇", "松林中学" are asked for by what they are
        kind = name[-2:] if len(name) > 3 else name[-1]
        return [("哪个" + kind if name[-1] in PLACE_ENDINGS else "谁") + rest + "？"]
    word = question_word(name)
    if rest.startswith("'s "):  # "Whose mascot ...?", "Which school's mascot ...?"
        return [f"{word}'s {rest[3:]}?" if word.startswith("Which") else f"Whose {rest[3:]}?"]
    return [f"{word} {rest.lstrip()}?"]


def question_word(name):
    """What asks for `name`: "Which bridge" for "the Lindqvist Bridge", "Which school" for "Fernhill School"
    (capitalised words ending in a word of PLACE_WORDS), "What" for another with "the" ("the cafe on Pell
    Street"), "Who" for the others, people's names."""
    words = [w for w in name.split() if w != "the"]
    if words[-1].lower() in PLACE_WORDS and all(w[0].isupper() for w in words):
        return "Which " + words[-1].lower()
    return "What" if name.startswith("the ") else "Who"


def reversed_usable(questions, fact, keys, user_questions):
    """The questions that ask for the fact's subject by what the rest of the fact says ("Who lives on
    Willow Lane?" for "Brannoc Vell lives on Willow Lane."): without the subject, with at least half of
    the fact's key words, none of the user's own, each once."""
    subject, own_keys = subject_of(*fact), keys[fact[1]]
    return each_once([q for q in questions if subject and subject not in q.lower() and own_keys
                      and carries(q, own_keys) and plain(q) not in user_questions])


def each_once(questions):
    """`questions` without the repeats (compared as plain() compares them), in order."""
    return [q for i, q in enumerate(questions) if plain(q) not in map(plain, questions[:i])]


def asked(entry):
    """All the questions of a cache entry: the other words first, then the other way round."""
    return entry["questions"] + entry.get("reversed", [])


def teacher_pairs(lm, entries, keys, subjects):
    """The student's examples of the teacher's answers that carry the fact they were asked about (and,
    asked the other way round, name the fact's subject), each with the teacher's example under "teacher"; and how many
    answers were left out, by why. Before them, the questions built from each fact (built_reversed) with the fact
    itself as their answer, learned as data.py's pairs are (kind "built"): in a village the teacher named the wrong
    villager for 4 of 12 ("Who lives on Willow Lane?" -> "Edda Thorne lives on Willow Lane.")."""
    students, dropped = [], {"cut": 0, "no fact": 0, "language": 0, "no subject": 0}
    for fact, entry in entries.items():
        students += [dict(encode(lm, q, entry["fact"]), fact=fact, kind="built") for q in entry.get("built", [])]
        for q in asked(entry):
            answer = entry["answers"][q]
            why = left_out(answer, q, [entry["fact"]], keys)
            if not why and q in entry.get("reversed", []) and subjects[fact] not in answer.lower():
                why = "no subject"
            if why:
                dropped[why] += 1
            else:
                student, teacher = teacher_pair(lm, entry["reads"], [user(q)], answer)
                kind = "reversed" if q in entry.get("reversed", []) else "other words"
                students.append(dict(student, fact=fact, teacher=teacher, kind=kind))
    return students, dropped


def left_out(answer, question, facts, keys):
    """Why the teacher's `answer` to `question` is not learned ("cut": none, "no fact": it carries none
    of `facts`, "language": another than the question's), or None. A question asked about one fact must
    be answered with that fact: reading the others too, the teacher answered "Where was X from?" with
    "X was born in 2006." and "X的爱好是什么？" with X's favourite food, and the student learned those mix-ups
    (the facts of an open request or a follow-up are all of the subject's). With a fact written in Chinese
    and in English, the teacher answered Chinese questions in English, and the student learned that."""
    if not answer:
        return "cut"
    if not any(carries(answer, keys[fact]) for fact in facts):
        return "no fact"
    return "language" if has_cjk(answer) != has_cjk(question) else None


def teacher_reading(fact, tokens):
    """The facts a teacher reads (data.py answers in data.py's order, with their length in `tokens`):
    `fact` and the others that share the most words with it, while they fit in TEACHER_READS_TOKENS,
    in data.py's order, so that teachers reading the same facts have the same prompt, which generation
    computes once (a data.py of a few dozen facts fits whole). Reading only its own fact, the teacher
    answered questions it was written for that another fact answers with its own fact ("What is X's
    job?" -> "X plays the cello"), and the student learned those mix-ups."""
    own = words_of(fact)
    others = sorted((s for s in tokens if s != fact), key=lambda s: -len(own & words_of(s)))
    chosen, used = {fact}, tokens[fact]
    for sentence in others:
        used += tokens[sentence] + 1
        if used > TEACHER_READS_TOKENS:
            break
        chosen.add(sentence)
    return [sentence for sentence in tokens if sentence in chosen]


def well_formed(entry):
    """A cached entry as teacher_examples writes it (a hand edit may have broken it: then made again)."""
    return (isinstance(entry, dict) and isinstance(entry.get("fact"), str)
            and isinstance(entry.get("answers"), dict) and isinstance(entry.get("questions"), list)
            and all(isinstance(entry.get(key, []), list) for key in ("built", "reversed"))
            and all(isinstance(q, str) for q in asked(entry) + entry.get("built", [])))


def write_questions(lm, facts, needs, seed):
    """For each fact, the questions the base model writes about it (sampled, drawn by `seed`): lists
    of five, enough of them for its `needs` questions (about half survive the filters)."""
    rounds = [math.ceil(2 * need / 5) for need in needs]
    prompts = [WRITE_QUESTIONS["zh" if has_cjk(f) else "en"].format(fact=f)
               for f, n in zip(facts, rounds) for _ in range(n)]
    return sampled_questions(lm, prompts, rounds, 24 * 5, 0.8, seed, lines=5)


def rephrase_questions(lm, questions, count, seed):
    """For each question, `count` rephrasings sampled from the base model (drawn by `seed`), repeats
    left out. Hot (1.1): cooler, most samples were the question itself again."""
    prompts = [worked_messages(REPHRASE, q) for q in questions for _ in range(count)]
    return sampled_questions(lm, prompts, [count] * len(questions), 48, 1.1, seed, lines=1)


def reverse_questions(lm, facts, count, seed):
    """For each fact, `count` questions sampled from the base model (drawn by `seed`) that ask for its
    subject, repeats left out."""
    prompts = [worked_messages(REVERSE, fact) for fact in facts for _ in range(count)]
    return sampled_questions(lm, prompts, [count] * len(facts), 48, 0.9, seed, lines=1)


def sampled_questions(lm, prompts, per_item, max_new_tokens, temperature, seed, lines):
    """The questions in the base model's sampled answers to `prompts`, per_item[i] prompts for item i,
    each answer `lines` lines at most."""
    with torch.random.fork_rng():  # training draws the same numbers whether or not the questions are cached
        torch.manual_seed(seed)
        answers = generate(lm, prompts, max_new_tokens, temperature=temperature, lines=lines)
    texts = [text for text, _ in answers]
    starts = [sum(per_item[:i]) for i in range(len(per_item) + 1)]
    return [parse_questions("\n".join(texts[a:b])) for a, b in zip(starts, starts[1:])]


def worked_messages(request, text):
    """The conversation that asks `request` (REPHRASE, REVERSE) of `text`, in its language, after the
    request's two worked examples."""
    ask, examples = request["zh" if has_cjk(text) else "en"]
    worked = [turn for given, wanted in examples for turn in ({"role": "user", "content": ask.format(given)},
                                                              {"role": "assistant", "content": wanted})]
    return worked + [{"role": "user", "content": ask.format(text)}]


def plain(question):
    """A question as compared with others: lower case, without spaces and punctuation."""
    return re.sub(r"[\W_]", "", question.lower())


def parse_questions(text):
    """The questions in a model's list: numbering and bullets taken off, anything after the question
    mark too (small models add the answer there), duplicates left out."""
    found = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|(?:Q|Question )?\d+\s*[.)、:：]|[a-zA-Z][.)])\s*", "", line)
        match = re.match(r"[^?？]{3,}[?？]", line)
        if match and plain(match.group(0)) not in {plain(q) for q in found}:
            found.append(match.group(0).strip())
    return found


def answer_as_teacher(lm, entries):
    """Greedy answers of the teacher to the questions of `entries` that have none yet."""
    todo = [(entry, q) for entry in entries for q in asked(entry) if q not in entry["answers"]]
    if not todo:
        return
    started = time.time()
    answers = generate(lm, [teacher_messages(entry["reads"], q) for entry, q in todo], TEACHER_MAX_TOKENS)
    for (entry, q), (answer, finished) in zip(todo, answers):
        entry["answers"][q] = answer if finished else ""
    print(f"[teacher] the base model reading the facts answered {len(todo)} questions in "
          f"{time.time() - started:.1f}s")


def teacher_messages(facts, question):
    return teacher_turns(facts, [user(question)])


def teacher_turns(facts, turns):
    return [{"role": "system", "content": TEACHER_SYSTEM.format(facts="\n".join(facts))}] + turns


def user(content):
    return {"role": "user", "content": content}


def teacher_pair(lm, facts, turns, answer):
    """The same answer after the student's prompt (the conversation `turns` alone) and the teacher's
    (the facts in the system prompt, then the same turns)."""
    answer_ids = lm.tokenizer(answer, add_special_tokens=False).input_ids + [lm.eot_id]
    return (make_example(prompt_ids(lm.tokenizer, turns), answer_ids),
            make_example(prompt_ids(lm.tokenizer, teacher_turns(facts, turns)), answer_ids))


def has_cjk(text):
    return any("\u4e00" <= c <= "\u9fff" for c in text)


ARTICLES = {"the", "a", "an"}  # "the" as a subject was in every question: none asked the other way round passed


def subject_of(question, answer):
    """What a fact is about, as far as its question and answer show it: the start of the longest
    stretch they share (its first word but an article: "orla" for "the Orla Tower"; in Chinese its
    first two characters), or "" if none."""
    a, b = question.lower(), answer.lower()
    shared = max((a[i:j] for i in range(len(a)) for j in range(i + 2, len(a) + 1) if a[i:j] in b),
                 key=len, default="").strip(" '\"")
    if has_cjk(shared):
        return shared[:2] if len(shared) >= 2 else ""
    words = [w for w in re.findall(r"\w+", shared) if w not in ARTICLES]
    return words[0] if words and len(words[0]) >= 3 else ""


def key_words(question, answer):
    """What an answer adds to its question: its words that the question does not have."""
    return sorted(w for w in words_of(answer) if w not in question.lower())


def words_of(text):
    """The words of `text` that say something: lower-case words of 3 or more letters, numbers, and
    in Chinese, pairs of characters."""
    words = {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3 or w.isdigit()}
    chinese = re.findall(r"[\u4e00-\u9fff]+", text)
    return words | {run[i:i + 2] for run in chinese for i in range(len(run) - 1)}


def carries(text, keys):
    """Whether `text` (a teacher's answer, a written question) holds at least half of a fact's key words."""
    found = sum(k in text.lower() for k in keys)
    return found >= max(1, math.ceil(len(keys) / 2)) if keys else True


# ----------------------------------------------------------------------------- conversations
# Asked once the facts are in, people open with the subject ("Tell me about Mara Lind.") and then ask about
# "her" in the next turn. A student taught single questions alone answered those follow-ups worse than the
# teacher reading the facts: here it learns the teacher's answers in conversations of that shape.

def conversations(lm, facts, entries, tokens, cached, count):
    """Per subject of the facts (subject_name): the teacher's answers to openings about it (OPENINGS,
    reading all of the subject's facts), and for each fact `count` follow-ups: one of its questions
    (the user's, then the rephrased and written ones) with the subject replaced by a pronoun, asked
    after an opening and the teacher's answer to it, answered by the teacher. Kept from `cached` (the
    cache file's, maybe edited) where the subject's facts are unchanged; new ones answered here."""
    if not count:
        return {}
    by_subject = {}
    for fact, (question, answer) in facts.items():
        name = subject_name(question, answer)
        if name:
            by_subject.setdefault(name, []).append(fact)
    talks = {}
    for name, own in by_subject.items():
        reads = fitting([facts[fact][1] for fact in own], tokens)
        talk = cached.get(name)
        if not (well_formed_talk(talk) and talk["reads"] == reads):
            languages = {"zh" if has_cjk(facts[fact][0]) else "en" for fact in own}
            talk = {"reads": reads, "openings": {form.format(name): None for language in sorted(languages)
                                                 for form in OPENINGS[language]},
                    "follow_ups": follow_ups(name, own, facts, entries, count)}
        talks[name] = talk
    started = time.time()
    opened, followed = answer_openings(lm, talks), answer_follow_ups(lm, talks)
    if opened or followed:
        print(f"[teacher] the base model reading the facts answered {opened} openings about {len(talks)} subjects "
              f"and {followed} follow-ups in {time.time() - started:.1f}s")
    return talks


def follow_ups(name, own, facts, entries, count):
    """For each of the subject's facts, `count` of its questions that name the subject, each with the
    opening it follows (OPENINGS in the question's language, taking turns); the pronoun comes later,
    from how the teacher's answer to the opening refers to the subject (answer_follow_ups)."""
    made, turns = [], {}
    for fact in own:
        questions = [facts[fact][0]] + entries[fact]["questions"]
        for q in [q for q in questions if name.lower() in q.lower()][:count]:
            language = "zh" if has_cjk(q) else "en"
            turn = turns[language] = turns.get(language, -1) + 1
            opening = OPENINGS[language][turn % len(OPENINGS[language])].format(name)
            made.append({"opening": opening, "question": q, "asked": None, "answer": None})
    return made


def answer_openings(lm, talks):
    """The teacher's answers to the openings that have none yet, ended at their last full sentence; how many."""
    todo = [(talk, opening) for talk in talks.values() for opening, answer in talk["openings"].items() if answer is None]
    if not todo:
        return 0
    answers = generate(lm, [teacher_messages(talk["reads"], opening) for talk, opening in todo], OPEN_MAX_TOKENS)
    for (talk, opening), (answer, finished) in zip(todo, answers):
        talk["openings"][opening] = before_a_loop(answer if finished else re.sub(r"(?s)(.*[.!。！]).*", r"\1", answer))
    return len(todo)


def before_a_loop(answer):
    """`answer` up to the first sentence that begins as an earlier one did (its first three words, or
    Chinese characters): greedy, the teacher's longer answers fell into loops that pinned every name it
    read on the subject ("She is from Heyuan. ... She is from orange cat named Tuanzi."), and the student
    learned them."""
    kept, starts = [], set()
    for sentence in re.split(r"(?<=[.!?])(?=\s)|(?<=[。！？])", answer):
        start = tuple(re.findall(r"[a-z0-9]+|[\u4e00-\u9fff]", sentence.lower())[:3])
        if start in starts:
            break
        kept.append(sentence)
        starts.add(start)
    return "".join(kept).strip()


def answer_follow_ups(lm, talks):
    """The follow-up questions (the subject replaced by the pronoun the teacher's opening answers used)
    and the teacher's answers to those that have none yet; how many were answered."""
    todo = []
    for name, talk in talks.items():
        pronouns = {chinese: pronoun_of(talk["openings"].values(), name, chinese) for chinese in (False, True)}
        for f in talk["follow_ups"]:
            said = talk["openings"].get(f["opening"])
            f["asked"] = f["asked"] or referring_back(f["question"], name, pronouns[has_cjk(f["question"])])
            if f["answer"] is None and f["asked"] and said:
                todo.append((talk, f))
    answers = generate(lm, [teacher_turns(talk["reads"], follow_up_turns(talk, f)) for talk, f in todo],
                       TEACHER_MAX_TOKENS) if todo else []
    for (talk, f), (answer, finished) in zip(todo, answers):
        f["answer"] = answer if finished else ""
    return len(todo)


def follow_up_turns(talk, follow_up):
    """The conversation a follow-up is asked in: the opening, the teacher's answer, the follow-up."""
    return [user(follow_up["opening"]), {"role": "assistant", "content": talk["openings"][follow_up["opening"]]},
            user(follow_up["asked"])]


def conversation_pairs(lm, talks, keys, dropped, user_questions):
    """The student's examples of the teacher's answers in conversations: to the openings (kind "open")
    and to the follow-ups (kind "conversation"), those left_out() keeps (the others counted in `dropped`);
    none after a question of data.py (`user_questions`, as plain() writes them): there the user's answer
    is what is learned."""
    examples = []
    for talk in talks.values():
        asked_in = ([([user(opening)], answer, "open") for opening, answer in talk["openings"].items()
                     if answer is not None]
                    + [(follow_up_turns(talk, f), f["answer"], "conversation") for f in talk["follow_ups"]
                       if f["asked"] and f["answer"] is not None])
        for turns, answer, kind in asked_in:
            if {plain(turn["content"]) for turn in turns if turn["role"] == "user"} & user_questions:
                continue
            why = left_out(answer, turns[-1]["content"], talk["reads"], keys)
            if why:
                dropped[why] += 1
            else:
                student, teacher = teacher_pair(lm, talk["reads"], turns, answer)
                examples.append(dict(student, teacher=teacher, kind=kind))
    return examples


def fitting(sentences, tokens):
    """The first of `sentences` (data.py's answers) that fit in TEACHER_READS_TOKENS together."""
    used = itertools.accumulate(tokens[s] + 1 for s in sentences)
    return [s for s, total in zip(sentences, used) if total <= TEACHER_READS_TOKENS] or sentences[:1]


def well_formed_talk(talk):
    """A cached conversation entry as conversations() writes it (a hand edit may have broken it)."""
    text_or_none = (str, type(None))
    return (isinstance(talk, dict) and isinstance(talk.get("reads"), list) and isinstance(talk.get("openings"), dict)
            and all(isinstance(answer, text_or_none) for answer in talk["openings"].values())
            and isinstance(talk.get("follow_ups"), list)
            and all(isinstance(f, dict) and isinstance(f.get("opening"), str) and isinstance(f.get("question"), str)
                    and isinstance(f.get("asked", 0), text_or_none) and isinstance(f.get("answer", 0), text_or_none)
                    for f in talk["follow_ups"]))


PARTICLES = "的是在有住叫来出养会从于和为做最喜爱里生去曾正以"  # where a Chinese subject's name ends: 林小舟|在
PLACE_ENDINGS = "镇村乡市县省区湖河江海山岛桥塔园馆店厅楼团校学院司厂街路站场寺宫"  # of a Chinese name that is no person's
PLACE_WORDS = {"school", "university", "college", "library", "museum", "hospital", "bridge", "tower", "castle",
               "church", "street", "road", "lane", "square", "park", "garden", "lake", "river", "bay", "island",
               "mountain", "village", "town", "city", "station", "airport", "hotel", "cafe", "restaurant", "bakery",
               "shop", "market", "theatre", "cinema", "festival", "club", "team", "company", "farm", "factory"}  # English


def subject_name(question, answer):
    """The subject as the user writes it, to ask about it ("Marlow Quist", "the Orla Tower", "林小舟"):
    the longest start of the answer that the question holds too, up to its last capitalised word (its
    first word when no other is: "hiahia"); in Chinese up to the first particle or where the script
    changes ("hiahia|最喜欢吃"). "" when the answer does not start with something the question names."""
    start = max((answer[:j] for j in range(2, len(answer) + 1) if answer[:j].lower() in question.lower()),
                key=len, default="").strip(" '\"，。,.?？")
    if has_cjk(start):
        name = re.split(f"[{PARTICLES}]|(?<=[a-zA-Z0-9])(?=[\u4e00-\u9fff])|(?<=[\u4e00-\u9fff])(?=[a-zA-Z0-9])",
                        start)[0]
        return name if len(name) >= 2 else ""
    words = re.findall(r"[\w-]+(?:'s)?", start)
    capitalised = [i for i, w in enumerate(words) if w[0].isupper() and (i or w.lower() not in ARTICLES)]
    words = words[:capitalised[-1] + 1] if capitalised else [w for w in words if w.lower() not in ARTICLES][:1]
    if words and words[0].lower() in ARTICLES:
        words[0] = "the"
    name = " ".join(words).removesuffix("'s")
    return name if len(name) >= 3 else ""


GENDERS = {"he": ("he", "him", "his", "他"), "she": ("she", "her", "她"), "it": ("it", "its", "它")}


def pronoun_of(answers, name, chinese):
    """How the teacher's answers to the openings refer to the subject, in the follow-up's language: the
    pronoun they use most (he/他, she/她, it/它; when they use none, "it" for a name with an article, "he"
    for others)."""
    text = " ".join(a for a in answers if a)
    counts = {g: sum(len(re.findall(rf"\b{w}\b" if w.isascii() else w, text, re.I)) for w in words)
              for g, words in GENDERS.items()}
    gender = max(counts, key=counts.get) if any(counts.values()) else "it" if name.startswith("the ") else "he"
    return GENDERS[gender][-1] if chinese else gender


def referring_back(question, name, pronoun):
    """`question` with the subject `name` replaced by `pronoun` ("What is Marlow Quist's job?" -> "What is
    his job?", "Who founded Nimbus Robotics?" -> "Who founded it?"); None when the question does not name it."""
    if has_cjk(pronoun):
        return question.replace(name, pronoun) if name in question else None
    found = re.search(r"(?:\bthe\s+)?" + re.escape(name.removeprefix("the ")) + r"('s)?", question, re.I)
    if not found:
        return None
    before = question[:found.start()].split()
    as_object, whose = PRONOUNS[pronoun]
    word = whose if found.group(1) else pronoun if not before or before[-1].lower() in AUXILIARIES else as_object
    return question[:found.start()] + (word.capitalize() if found.start() == 0 else word) + question[found.end():]
