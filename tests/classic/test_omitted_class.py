"""Hinton's omitted class (§3 of Hinton et al. 2015): the recipe option, the transfer set without the class, the
bias raise chosen on the validation split, and the report's section. The flow itself runs on the miniature recipe
in tests/classic/test_classifier_kd.py."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdflow.classic import omitted
from kdflow.classic.digits import Split
from kdflow.classic.fit import LOGITS, fit, read_splits, transfer_rows, write_splits
from kdflow.config.classic import parse_classifier_recipe
from kdflow.config.loading import RecipeError
from kdflow.store.outputs import content_key

ROOT = Path(__file__).resolve().parents[2]
MINI = (ROOT / "tests" / "classifier_mini.yaml").read_text()


# ---- recipe ------------------------------------------------------------------------------------------------


def test_the_recipe_option_is_typed_and_checked():
    assert parse_classifier_recipe(MINI, "mini.yaml").omitted_class.label == 3
    assert parse_classifier_recipe(MINI.replace("omitted_class: {label: 3}\n", ""), "m.yaml").omitted_class is None
    with pytest.raises(RecipeError, match="omitted_class.label is 10 but the digits are 0-9"):
        parse_classifier_recipe(MINI.replace("{label: 3}", "{label: 10}"), "mini.yaml")
    with pytest.raises(RecipeError, match=r"omitted_class\.lable: unknown field"):
        parse_classifier_recipe(MINI.replace("{label: 3}", "{lable: 3}"), "mini.yaml")
    head = MINI[: MINI.index("teacher:")].replace("source: digits", "source: reviews\n  rows: 500")
    reviews = (
        head
        + """
teacher: {model: {kind: transformer, hidden: 16, layers: 1, heads: 2, intermediate: 32}}
student: {model: {kind: transformer, hidden: 8, layers: 1, heads: 2, intermediate: 8}}
distill: {temperature: 2.0, alpha: 0.5}
seeds: [0]
omitted_class: {label: 1}
"""
    )
    with pytest.raises(RecipeError, match="omitted_class works on data.source 'digits' only"):
        parse_classifier_recipe(reviews, "mini.yaml")


# ---- the transfer set --------------------------------------------------------------------------------------


def test_drop_class_removes_every_row_of_the_class_and_keeps_soft_targets_aligned():
    split = Split(torch.arange(12, dtype=torch.float32).reshape(6, 2), torch.tensor([0, 3, 1, 3, 2, 0]))
    teacher = torch.randn(6, 4)
    kept, soft = omitted.drop_class(split, 3, teacher)
    assert 3 not in kept.y.tolist() and kept.y.tolist() == [0, 1, 2, 0]
    assert torch.equal(kept.x, split.x[[0, 2, 4, 5]]) and torch.equal(soft, teacher[[0, 2, 4, 5]])
    assert omitted.drop_class(split, 3)[1] is None


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    """The digits splits written as the data stage writes them, behind a ref ``fit`` can read."""
    from kdflow.config.classic import ClassifierDataSection
    from kdflow.store.outputs import OutputRef

    folder = tmp_path_factory.mktemp("data")
    write_splits(ClassifierDataSection(source="digits"), folder)
    return OutputRef(stage="classifier-data", key="k", path=str(folder), sha256="s")


@pytest.mark.parametrize("label", [3, 9])
def test_a_student_fitted_without_a_class_never_sees_it_but_still_has_its_output(
    digits_data, tmp_path, monkeypatch, label
):
    from kdflow.classic import digits
    from kdflow.config.classic import MLP

    seen = {}
    real_train = digits.train

    def spy(model, data, training, seed, **kd):
        seen.update(y=data.y.clone(), x=data.x.clone(), soft=kd["teacher_logits"])
        return real_train(model, data, training, seed, **kd)

    monkeypatch.setattr(digits, "train", spy)
    splits = read_splits(digits_data)
    teacher = torch.randn(len(splits["train"]), 10)
    model = MLP(kind="mlp", hidden=[4], training={"epochs": 1, "learning_rate": 1e-3})
    fit(model, digits_data, 0, tmp_path, teacher, 0.1, 4.0, omit_class=label)

    keep = splits["train"].y != label
    assert int((~keep).sum()) > 50 and label not in seen["y"].tolist()
    assert torch.equal(seen["x"], splits["train"].x[keep]) and torch.equal(seen["soft"], teacher[keep])
    assert transfer_rows(digits_data, label) == len(seen["y"]) == int(keep.sum())
    logits = load_file(tmp_path / LOGITS)  # every row of every split, and an output for the missing class
    assert {k: tuple(v.shape) for k, v in logits.items()} == {k: (len(s), 10) for k, s in splits.items()}


def test_a_student_key_without_an_omitted_class_is_the_key_it_had_before_the_option():
    from tasks.classifier import STUDENT

    args = dict(model={"m": 1}, data={"d": 1}, teachers=[], distill=None, seed=2)
    assert STUDENT.key(**args) == content_key("classifier-student", "1", args)
    assert STUDENT.key(**args, omit_class=3) != STUDENT.key(**args)
    assert STUDENT.key(**args, omit_class=3) != STUDENT.key(**args, omit_class=4)


# ---- the bias raise -----------------------------------------------------------------------------------------

# label 2; each row's threshold (best other logit minus its logit for 2): 1, 2, 3, 1.5.
VAL_LOGITS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.5, 0.0]])
VAL_LABELS = torch.tensor([2, 2, 0, 1])


def test_the_bias_raise_maximises_accuracy_exactly_and_ties_go_to_the_smallest():
    # correct rows: 2 below 1; 3 in (1, 1.5); 2 in (1.5, 2); 3 in (2, 3); 2 above 3 -> the midpoint of (1, 1.5)
    assert omitted.bias_for_class(VAL_LOGITS, VAL_LABELS, 2) == pytest.approx(1.25)
    # without the last row, (1, 1.5) no longer beats (1.5, 2) and (2, 3) wins alone
    assert omitted.bias_for_class(VAL_LOGITS[:3], VAL_LABELS[:3], 2) == pytest.approx(2.5)
    # nothing to gain: no raise
    assert omitted.bias_for_class(torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]]), torch.tensor([2, 0]), 2) == 0.0


def test_raising_the_bias_moves_only_that_class_logit():
    z = torch.randn(7, 10)
    raised = omitted.raise_bias(z, 3, 2.5)
    diff = raised - z
    assert torch.allclose(diff[:, 3], torch.full((7,), 2.5)) and not diff[:, [0, 1, 2, 4, 5, 6, 7, 8, 9]].any()
    assert not torch.equal(raised, z) and z[:, 3].ne(raised[:, 3]).all()  # the input is left as it was


def test_the_bias_is_chosen_on_validation_only_and_scored_on_test():
    test_logits = torch.tensor([[0.0, 0.0, -1.2], [0.0, 0.0, -1.4], [2.0, 0.0, 0.0]])
    splits = {"val": Split(torch.zeros(4, 1), VAL_LABELS), "test": Split(torch.zeros(3, 1), torch.tensor([2, 2, 0]))}
    figures = omitted.evaluate({"val": VAL_LOGITS, "test": test_logits}, splits, 2)
    assert figures["bias"] == pytest.approx(1.25)  # from val alone
    assert figures["class"] == {"accuracy": 0.0, "errors": 2, "rows": 2}
    assert figures["class_raised"] == {"accuracy": 0.5, "errors": 1, "rows": 2}  # -1.2 + 1.25 > 0; -1.4 + 1.25 < 0
    assert figures["test_accuracy"] == pytest.approx(1 / 3) and figures["test_accuracy_raised"] == pytest.approx(2 / 3)
    # other test logits: the same raise; other val logits: another raise
    assert omitted.evaluate({"val": VAL_LOGITS, "test": test_logits * 5}, splits, 2)["bias"] == figures["bias"]
    assert (
        omitted.evaluate({"val": VAL_LOGITS[[0, 1, 2, 2]], "test": test_logits}, splits, 2)["bias"] != figures["bias"]
    )


# ---- the report ---------------------------------------------------------------------------------------------


def test_the_report_section_carries_the_figures_over_seeds():
    def student(bias, errors, raised_errors):
        return {
            "bias": bias,
            "class": {"accuracy": 1 - errors / 10, "errors": errors, "rows": 10},
            "class_raised": {"accuracy": 1 - raised_errors / 10, "errors": raised_errors, "rows": 10},
            "test_accuracy": 0.9,
            "test_accuracy_raised": 0.95,
        }

    per_seed = {
        0: {"hard-label student": student(0.0, 10, 10), "KD student": student(3.0, 8, 1)},
        1: {"hard-label student": student(1.0, 10, 9), "KD student": student(4.0, 6, 3)},
    }
    refs = {s: {"ensemble of 2": {"accuracy": 0.9, "errors": 1, "rows": 10}} for s in (0, 1)}
    section = omitted.summarize(3, 700, per_seed, refs)
    kd = section["students"]["KD student"]
    assert section["label"] == 3 and section["seeds"] == [0, 1] and section["bias_chosen_on"] == "val"
    assert section["transfer_rows"] == 700 and section["test_rows_of_class"] == 10
    assert kd["bias"]["mean"] == 3.5 and kd["class_errors"]["values"] == [8, 6]
    assert kd["class_accuracy"]["mean"] == pytest.approx(0.3) and kd["class_accuracy_raised"]["mean"] == pytest.approx(
        0.8
    )
    assert section["references"]["ensemble of 2"]["mean"] == pytest.approx(0.9)
    md = omitted.render_markdown(section)
    assert "no 3s in the students' transfer set" in md and "validation split (never the test split)" in md
    assert "| KD student | 30.0 ± 14.1 | 80.0 ± 14.1 | 8→1 6→3 | 3.50 ± 0.71 | 90.00 ± 0.00 | 95.00 ± 0.00 |" in md
