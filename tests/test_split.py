"""Validation by fact: pairs with the same answer are one fact; only extra phrasings are held out."""
import train


def test_answers_that_differ_in_spaces_and_end_punctuation_are_one_fact():
    assert train.fact_of(" hiahia出生于2006年。") == train.fact_of("hiahia出生于2006年") == "hiahia出生于2006年"
    assert train.fact_of("Born in 2006.") == train.fact_of("Born in 2006!  ") != train.fact_of("born in 2006")


def test_a_fact_written_once_is_never_held_out():
    facts = [f"fact {i}" for i in range(10)]
    for seed in range(20):
        assert train.split_by_fact(facts, 0.5, seed) == (list(range(10)), [])


def test_held_out_phrasings_come_only_from_facts_that_stay_trained():
    # fact a: 4 phrasings, b: 2, c and d: once each
    facts = ["a", "a", "b", "c", "a", "b", "d", "a"]
    for seed in range(50):
        train_at, val_at = train.split_by_fact(facts, 0.5, seed)
        assert sorted(train_at + val_at) == list(range(8))
        assert {facts[i] for i in train_at} == {"a", "b", "c", "d"}  # every fact trained
        assert {facts[i] for i in val_at} <= {"a", "b"}
        assert len(val_at) == 4  # round(8 * 0.5): a gives up 3, b gives up 1


def test_validation_spreads_over_facts_before_taking_a_second_phrasing_of_one():
    facts = [name for name in "abcd" for _ in range(3)]  # 4 facts x 3 phrasings
    for seed in range(20):
        _, val_at = train.split_by_fact(facts, 0.34, seed)  # round(12 * 0.34) = 4
        assert sorted(facts[i] for i in val_at) == ["a", "b", "c", "d"]


def test_the_split_is_reproducible_from_the_seed():
    facts = [name for name in "abcdef" for _ in range(3)]
    assert train.split_by_fact(facts, 0.2, 42) == train.split_by_fact(facts, 0.2, 42)
    assert len({tuple(train.split_by_fact(facts, 0.2, seed)[1]) for seed in range(10)}) > 1
