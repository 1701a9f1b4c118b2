from data.arithmetic import check_answer, extract_answer
from kdflow.curate import NO_FINAL_ANSWER, TRUNCATED, WRONG_ANSWER, filter_by_correctness, reason_counts


def answer(i, text, finish="stop", gold="15"):
    return {"id": f"r{i}", "question": "12+3", "answer": gold, "text": text, "finish_reason": finish}


ROWS = [
    answer(0, "12+3=15\nAnswer: 15"),
    answer(1, "12+3=16\nAnswer: 16"),
    answer(2, "12+3=15\n"),
    answer(3, "12+3=15\n12+3=15\n12+", finish="length"),
    answer(4, "12+3=15\nAnswer: 15", finish="length"),
    answer(5, "12+3=15\nAnswer: 15"),
]


def test_kept_plus_dropped_is_the_input_and_every_drop_has_a_reason():
    kept, dropped = filter_by_correctness(ROWS, check_answer, extract_answer)
    assert [r["id"] for r in kept] == ["r0", "r5"]
    assert sorted(r["id"] for r in kept + dropped) == sorted(r["id"] for r in ROWS)
    reasons = {r["id"]: r["reasons"] for r in dropped}
    assert reasons == {"r1": [WRONG_ANSWER], "r2": [NO_FINAL_ANSWER], "r3": [TRUNCATED, NO_FINAL_ANSWER],
                       "r4": [TRUNCATED]}
    assert all(r["text"] for r in dropped)  # the raw text stays with the drop
    assert reason_counts(dropped) == {WRONG_ANSWER: 1, NO_FINAL_ANSWER: 2, TRUNCATED: 2}


def test_nothing_dropped_when_all_are_right():
    kept, dropped = filter_by_correctness([ROWS[0], ROWS[5]], check_answer, extract_answer)
    assert len(kept) == 2 and dropped == []
