"""The recall report's marks: the expected answer itself, the same fact in other words, or wrong."""
import pytest

import train


@pytest.mark.parametrize("question, expected, answer, mark", [
    ("Who owns the mill?", "The mill is owned by Mara Lind.", "Yes. The mill is owned by Mara Lind.", "exact"),
    # key words lind, mara, owned: all there, "owns" for "owned"
    ("Who owns the mill?", "The mill is owned by Mara Lind.", "Mara Lind owns the mill.", "same fact"),
    ("Who owns the mill?", "The mill is owned by Mara Lind.", "The mill is owned by Tom Reed.", "wrong"),
    ("Who owns the mill?", "The mill is owned by Mara Lind.", "Mara owns the mill.", "wrong"),  # 2 of 3
    # six key words (studies, computer, science, south, china, technology): one may be missing
    ("Which university does Anna attend?", "Anna studies computer science at South China University of Technology.",
     "Anna is a computer science student at South China University of Technology.", "same fact"),
    ("Which university does Anna attend?", "Anna studies computer science at South China University of Technology.",
     "Anna studies computer science at Tsinghua University.", "wrong"),
    # pairs of characters: 自广 广东 东河 河源; 自广 is missing
    ("hiahia来自哪里？", "hiahia来自广东河源。", "hiahia的家乡是广东河源。", "same fact"),
    ("hiahia来自哪里？", "hiahia来自广东河源。", "hiahia来自广东深圳。", "wrong"),
])
def test_an_answer_is_exact_the_same_fact_in_other_words_or_wrong(question, expected, answer, mark):
    assert train.verdict(question, expected, answer) == mark
