"""Does training teach facts, not sentences? Measured like a user (run by hand, not in CI).

    python tests/eval_knowledge.py                          # 5 fact sets x 3 seeds, default config.json
    python tests/eval_knowledge.py --sets held_out --seeds 7
    python tests/eval_knowledge.py --set lr=0.003           # a recipe change, as a config.json key

For each fact set of tests/fact_sets.py (none of them the shipped data.py, one question per fact)
and each seed, it runs `python train.py` in a fresh copy of the tool with the repository's
config.json (only the seed changed), then loads the base model + output/best_adapter with PEFT
and asks, greedily:
  - every question as written in data.py              -> "trained questions"
  - the same facts asked in other words               -> "other words"
  - ordinary questions the base model answers right   -> "ordinary kept"
and, asked the way people ask once the facts are in (tests/fact_sets.py's ASKED_OTHERWISE):
  - questions the other way round (the answer is the subject)  -> "reversed"
  - "Tell me about X": the share of X's facts the answer states  -> "open"
  - then, in the same conversation, a question about "he"/"it"  -> "follow-ups"
  - questions about a taught subject that no fact answers: the share answered with something
    invented rather than "I don't know"                          -> "unknown: invented" (also before training)
and, as the reference to reach, the base model with all the facts in its system prompt (train.py's
teacher prompt) asked the same (all but the trained and ordinary questions).
An answer is right when it contains the fact's keyword. It prints one line a run and a table of
means over the seeds; all answers go to output/eval_knowledge.json.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chat_model  # noqa: E402
import model_files  # noqa: E402
import teacher  # noqa: E402
import train  # noqa: E402
from conftest import copy_code  # noqa: E402
from teacher import user  # noqa: E402
from fact_sets import ASKED_OTHERWISE, FACT_SETS, NOT_KNOWN, ORDINARY  # noqa: E402


def right(answer, keywords):
    """Whether the answer contains the keyword (or one of a tuple of keywords), ignoring case."""
    return any(k.lower() in answer.lower() for k in ((keywords,) if isinstance(keywords, str) else keywords))


def train_once(facts, seed, overrides, work, shared_cache, fp32):
    """One `python train.py` in a fresh copy of the tool; returns its metrics.json."""
    os.makedirs(os.path.join(work, "output"))
    copy_code(work)
    if os.path.isdir(os.path.join(ROOT, "model")):  # the offline model, converted once, shared by every run
        os.symlink(os.path.join(ROOT, "model"), os.path.join(work, "model"))
    with open(os.path.join(work, "data.py"), "w", encoding="utf-8") as f:
        items = [{"instruction": q, "input": "", "output": a} for q, a, _, _ in facts]
        f.write("qa_data = " + json.dumps(items, ensure_ascii=False, indent=1) + "\n")
    with open(os.path.join(ROOT, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(work, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**config, "seed": seed, **overrides}, f)
    for name in os.listdir(shared_cache):  # the base model's answers: the same for every run
        shutil.copy(os.path.join(shared_cache, name), os.path.join(work, "output"))
    env = dict(os.environ, TQDM_DISABLE="1", **({"QWEN_LORA_FP32": "1"} if fp32 else {}))
    result = subprocess.run([sys.executable, "train.py"], cwd=work, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    for name in os.listdir(os.path.join(work, "output")):
        if name.startswith("base_answers_") and name.endswith(".json"):
            shutil.copy(os.path.join(work, "output", name), shared_cache)
    with open(os.path.join(work, "output", "metrics.json"), encoding="utf-8") as f:
        return json.load(f)


class Reader:
    """The base model, loaded once, asked with and without an adapter (through PEFT)."""

    def __init__(self, model_path):
        self.tokenizer, self.model = model_files.load_model(model_path, torch.device("cpu"), torch.float32)
        self.ordinary = self.ask([q for q, _ in ORDINARY])

    def ask(self, conversations, model=None, max_new_tokens=48):
        return train.ask(chat_model.LM.of(model or self.model, self.tokenizer), conversations, max_new_tokens)

    def answers(self, name, questions, model=None, facts=None):
        """What the model (the base model, or `model` with its adapter) answers to `questions`, the set's
        reversed and unknown questions and its conversations; with `facts`, reading them in its system
        prompt as train.py's teacher does."""
        start = teacher.teacher_messages([a for _, a, _, _ in facts], "")[:1] if facts else []
        asked = ASKED_OTHERWISE[name]
        answers = self.ask([start + [user(q)] for q in single_questions(name, questions)], model)
        opened = self.ask([start + [user(request)] for request, _, _ in asked["conversations"]], model, 128)
        followed = self.ask([start + [user(request), {"role": "assistant", "content": said}, user(q)]
                             for (request, _, then), said in zip(asked["conversations"], opened) for q, _ in then],
                            model)
        return answers, opened, followed

    def with_adapter(self, adapter_dir, name, questions):
        from peft import PeftModel
        model = PeftModel.from_pretrained(self.model, adapter_dir).eval()
        try:
            return self.answers(name, questions, model)
        finally:
            self.model = model.unload()  # the base model again, for the next run


def single_questions(name, questions):
    """`questions`, then the set's reversed and unknown questions: what Reader.answers asks one at a time."""
    asked = ASKED_OTHERWISE[name]
    return questions + [q for q, _ in asked["reversed"]] + asked["unknown"]


def asked_otherwise(name, answers, opened, followed):
    """The columns of the ways people ask once the facts are in, from Reader.answers (the reversed and
    unknown questions are the last of `answers`)."""
    asked = ASKED_OTHERWISE[name]
    reversed_, unknown = answers[-len(asked["reversed"]) - len(asked["unknown"]):], answers[-len(asked["unknown"]):]
    return {"reversed": statistics.mean(right(a, kw) for a, (_, kw) in zip(reversed_, asked["reversed"])),
            "open": statistics.mean(statistics.mean(right(a, kw) for kw in keywords)
                                    for a, (_, keywords, _) in zip(opened, asked["conversations"])),
            "follow_ups": statistics.mean(right(a, kw) for a, (_, kw) in
                                          zip(followed, [f for _, _, then in asked["conversations"] for f in then])),
            "unknown_invented": statistics.mean(not right(a, NOT_KNOWN) for a in unknown)}


def reference_columns(reader, name, facts, other_words):
    """The base model reading the facts, asked everything but the trained and ordinary questions, and the
    base model alone asked the unknown questions (how often it invents before any training)."""
    answers, opened, followed = reader.answers(name, other_words, facts=facts)
    read = asked_otherwise(name, answers, opened, followed)
    before = reader.ask(ASKED_OTHERWISE[name]["unknown"])
    return {"teacher_other_words": statistics.mean(right(a, f[2]) for a, f in
                                                   zip(answers, [f for f in facts for _ in f[3]])),
            **{f"teacher_{key}": value for key, value in read.items()},
            "base_unknown_invented": statistics.mean(not right(a, NOT_KNOWN) for a in before)}


def answers_by_question(name, questions, answers, opened, followed):
    asked = ASKED_OTHERWISE[name]
    singles = single_questions(name, questions)
    follow_ups = [f"{request} ... {q}" for request, _, then in asked["conversations"] for q, _ in then]
    return {**dict(zip(singles, answers)), **dict(zip([r for r, _, _ in asked["conversations"]], opened)),
            **dict(zip(follow_ups, followed))}


def score(facts, metrics, answers, base_ordinary):
    """The four numbers of one run, from the answers to [trained..., other words..., ordinary...]."""
    trained_idx = set(metrics["train_indices"])
    n_other = sum(len(f[3]) for f in facts)
    as_written, other, ordinary = (answers[:len(facts)], answers[len(facts):len(facts) + n_other],
                                   answers[len(facts) + n_other:len(facts) + n_other + len(ORDINARY)])
    keywords_other = [f[2] for f in facts for _ in f[3]]
    known = [i for i, (a, (_, kw)) in enumerate(zip(base_ordinary, ORDINARY)) if right(a, kw)]
    return {
        "facts_trained": len({i for i in trained_idx if i < len(facts)}) / len(facts),
        "trained_questions": statistics.mean(right(as_written[i], facts[i][2]) for i in sorted(trained_idx)),
        "other_words": statistics.mean(right(a, kw) for a, kw in zip(other, keywords_other)),
        "ordinary_kept": statistics.mean(right(ordinary[i], ORDINARY[i][1]) for i in known),
    }


TABLE = [("facts trained", "facts_trained"), ("trained questions", "trained_questions"),
         ("other words", "other_words", "teacher_other_words"), ("ordinary kept", "ordinary_kept"),
         ("reversed", "reversed", "teacher_reversed"), ("follow-ups", "follow_ups", "teacher_follow_ups"),
         ("open", "open", "teacher_open"),
         ("unknown: invented", "unknown_invented", "teacher_unknown_invented", "base_unknown_invented")]


def print_table(runs, sets, seeds, overrides):
    """The README's table: the mean over seeds of each set, and of all; beside a column, in brackets, the
    base model reading the facts (and, for unknown questions, the base model before training)."""
    print(f"\nmean of seeds {seeds}" + (f", config changes {overrides}" if overrides else ""))
    print("| set | " + " | ".join(column[0] for column in TABLE) + " | train s |")
    print("|---|" + "---|" * (len(TABLE) + 1))
    for name in sets + ["all"]:
        chosen = [r for r in runs if name in ("all", r["set"])]
        cells = [" / ".join(f"{statistics.mean(r[key] for r in chosen):.0%}" for key in column[1:])
                 for column in TABLE]
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(r['train_seconds'] for r in chosen):.0f} |")
    print("(in a cell: trained / base model reading the facts / base model before training)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["en_person", "en_places", "zh_en_person", "zh_places",
                                                      "village"], choices=sorted(ASKED_OTHERWISE))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config.json key (value as JSON), e.g. --set lr=0.003")
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "eval_knowledge.json"))
    parser.add_argument("--fp32", action="store_true",
                        help="train as on a CPU without bf16 (QWEN_LORA_FP32=1), also where the CPU has it")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    reader, runs = None, []
    with tempfile.TemporaryDirectory() as tmp:
        shared_cache = os.path.join(tmp, "cache")
        os.makedirs(shared_cache)
        for name in args.sets:
            facts = FACT_SETS[name]
            other_words = [q for f in facts for q in f[3]]
            questions = [f[0] for f in facts] + other_words + [q for q, _ in ORDINARY]
            references = None
            for seed in args.seeds:
                metrics = train_once(facts, seed, overrides, os.path.join(tmp, f"{name}_{seed}"), shared_cache,
                                     args.fp32)
                reader = reader or Reader(metrics["model"])
                references = references or reference_columns(reader, name, facts, other_words)
                answers, opened, followed = reader.with_adapter(
                    os.path.join(tmp, f"{name}_{seed}", "output", "best_adapter"), name, questions)
                run = {"set": name, "seed": seed, **score(facts, metrics, answers, reader.ordinary),
                       **asked_otherwise(name, answers, opened, followed), **references,
                       "epochs": len(metrics["train_loss"]), "best_epoch": metrics["best_epoch"],
                       "train_seconds": metrics["train_seconds"],
                       "answers": answers_by_question(name, questions, answers, opened, followed)}
                runs.append(run)
                print(f"{name:13s} seed {seed:3d}  " + "  ".join(
                    f"{column[0]} " + "/".join(f"{run[key]:.0%}" for key in column[1:]) for column in TABLE) +
                      f"  epochs {run['epochs']} (best {run['best_epoch']})  {run['train_seconds']:.0f}s", flush=True)
    print_table(runs, args.sets, args.seeds, overrides)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"seeds": args.seeds, "config_changes": overrides, "runs": runs,
                   "base_ordinary": dict(zip([q for q, _ in ORDINARY], reader.ordinary))}, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
