"""math-verify based final-answer checking and self-consistency (majority vote, selection policies)."""

from data import arithmetic
from kdflow.verify import Policy, Verdict, check_answer, final_answer, judge, majority, select


def test_verdicts():
    assert judge("5*3=15, so #### 72", "72") is Verdict.correct
    assert judge("5*3=15, so #### 71", "72") is Verdict.wrong
    assert judge("I cannot say.", "72") is Verdict.no_answer
    assert judge("", "72") is Verdict.no_answer
    assert judge("x = \\frac{1}{2}", "0.5") is Verdict.correct


def test_majority_vote_groups_equivalent_forms():
    texts = ["\\boxed{71}", "#### 72", "Answer: 72.0", "no idea", "$72", "#### 71"]
    assert majority(texts, check_answer, final_answer) == 1  # 72, 72.0 and $72 vote together against two 71s
    assert majority(["#### 3", "#### 4"], check_answer, final_answer) is None  # a tie has no majority
    assert majority(["nothing", ""], check_answer, final_answer) is None
    # The demo's exact checker votes the same way.
    assert majority(["Answer: 5", "Answer: 6", "Answer: 6"], arithmetic.check_answer, arithmetic.extract_answer) == 1


def test_selection_policies():
    samples = [{"text": "a long answer 72"}, {"text": "72"}, {"text": "72"}, {"text": "so 72"}]
    assert select(samples, Policy.all) == [1, 2, 3, 0]
    assert select(samples, Policy.shortest) == [1]
    assert select(samples, Policy.best_k, k=2) == [1, 3]  # distinct texts: the duplicate '72' is skipped
