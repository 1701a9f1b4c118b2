"""math-verify based final-answer checking and self-consistency (majority vote, selection policies)."""

from data import arithmetic
from kdflow.curation.verify import Policy, Verdict, check_answer, final_answer, judge, majority, select


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


# ---- every verification bounded, in any thread ------------------------------------------------------------
# math-verify's own timeout is SIGALRM (main thread only), and nothing interrupts the big-integer power of
# 9^9^9^9 in C: kdflow.curation.verify runs it in a worker process it kills. The tests take a 1 s bound; the
# `result(timeout=...)` below only keeps a regression from hanging the suite, it measures nothing.

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402

from kdflow.curation import verify  # noqa: E402
from kdflow.curation.verify import VerifyTimeout, run_calls  # noqa: E402

MONSTER = "so the answer is #### 9^9^9^9"
HANG_GUARD_S = 300


@pytest.fixture
def short_bound(monkeypatch):
    monkeypatch.setattr(verify, "TIMEOUT_S", 1.0)


def in_a_thread(fn, *args):
    with ThreadPoolExecutor(1) as pool:  # not the main thread: where math-verify's own timeout is off
        return pool.submit(fn, *args).result(timeout=HANG_GUARD_S)


def outcome(fn, *args):
    try:
        return fn(*args)
    except VerifyTimeout as e:
        return e


def test_a_runaway_answer_verified_from_a_worker_thread_gives_verify_timeout(short_bound):
    result = in_a_thread(outcome, check_answer, MONSTER, "72")
    assert isinstance(result, VerifyTimeout)
    assert "9^9^9^9" in str(result) and "TIMEOUT_S = 1 s" in str(result)
    assert in_a_thread(outcome, check_answer, "#### 72", "72") is True  # its worker was replaced, not stuck


def test_ordinary_answers_verify_from_worker_threads_at_once():
    cases = [
        ("5*3=15, so #### 72", "72", Verdict.correct),
        ("5*3=15, so #### 71", "72", Verdict.wrong),
        ("I cannot say.", "72", Verdict.no_answer),
        ("x = \\frac{1}{2}", "0.5", Verdict.correct),
        ("it costs $72.00 <<8*9=72>>", "72", Verdict.correct),
        ("", "72", Verdict.no_answer),
    ] * 5
    with ThreadPoolExecutor(4) as pool:  # several threads at once: each gets a worker of its own
        verdicts = list(pool.map(lambda case: judge(case[0], case[1]), cases, timeout=HANG_GUARD_S))
    assert verdicts == [expected for _, _, expected in cases]
    assert in_a_thread(final_answer, "48/2 = 24 <<48/2=24>>, so #### 72") == "72"


def test_a_batch_goes_on_past_the_answer_that_timed_out(short_bound):
    results = in_a_thread(
        run_calls, [("judge", ["#### 72", "72"]), ("judge", [MONSTER, "72"]), ("final_answer", ["#### 7.5"])]
    )
    assert results[0] == "correct" and isinstance(results[1], VerifyTimeout) and results[2] == "7.5"


def test_majority_blames_the_runaway_answer_not_the_one_compared_with_it(short_bound):
    texts = [MONSTER, "#### 72", "#### 72.0", "#### 71"]
    gave_up = {}
    assert in_a_thread(majority, texts, check_answer, final_answer, gave_up) == 1
    assert list(gave_up) == [0] and "9^9^9^9" in gave_up[0]
