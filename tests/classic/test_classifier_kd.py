"""Classic KD of classifiers: the recipe, the digits data, the MLP and transformers paths, and both flows on
the miniature recipe against a real (temporary) Prefect server."""

import asyncio
import json
from pathlib import Path

import pytest
import torch

from kdflow.classic import digits as classifier_kd
from kdflow.classic import hf as classifier_hf
from kdflow.config.classic import load_classifier_recipe, parse_classifier_recipe
from kdflow.config.loading import RecipeError
from kdflow.training.losses import hinton_loss

ROOT = Path(__file__).resolve().parents[2]
MINI = ROOT / "tests" / "classifier_mini.yaml"
SHIPPED = sorted((ROOT / "recipes").glob("classifier-*.yaml")) + [MINI]


@pytest.fixture
def mini(tmp_path) -> Path:
    """The miniature classifier recipe, writing its run folder under this test's tmp_path."""
    path = tmp_path / "classifier_mini.yaml"
    path.write_text(MINI.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}"))
    return path


# ---- recipe ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_classifier_recipe_validates_and_its_student_is_10x_smaller(path):
    r = load_classifier_recipe(path)
    size = lambda m: classifier_kd.count_params(classifier_kd.mlp(64, m.hidden, 10, m.dropout, seed=0))  # noqa: E731
    assert size(r.teacher.model) >= 10 * size(r.student.model)
    assert len(set(s for seed in r.seeds for s in r.member_seeds(seed))) == len(r.seeds) * r.teacher.ensemble


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as e:
        parse_classifier_recipe(text, "mini.yaml")
    return str(e.value)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_recipe_errors_name_file_line_field_and_fix():
    text = MINI.read_text().replace("    dropout: 0.2", "    dropuot: 0.2")
    msg = error_of(text)
    # the union's tag ("mlp") is not a YAML key: it is left out of the field's path
    assert f"mini.yaml:{line_of(text, 'dropuot')}: teacher.model.dropuot: unknown field" in msg

    msg = error_of(MINI.read_text().replace("ensemble_sizes: [1, 2]", "ensemble_sizes: [1, 3]"))
    assert "sweep.ensemble_sizes goes up to 3 but teacher.ensemble is 2" in msg
    msg = error_of(MINI.read_text().replace("alpha: 0.1}", "alpha: 1.0}"))
    assert "distill.alpha" in msg and "less than 1" in msg
    msg = error_of(MINI.read_text().replace("source: digits", "source: reviews\n  rows: 500"))
    assert "teacher.model.kind is 'mlp' but data.source 'reviews' needs kind 'transformer'" in msg


# ---- the digits path ------------------------------------------------------------------------------------


def test_digits_splits_are_disjoint_stratified_and_fixed_by_the_data_seed():
    a = classifier_kd.load_digits_splits(0, 0.4, 0.15)
    assert {k: len(v) for k, v in a.items()} == {"train": 808, "val": 270, "test": 719}
    rows = torch.cat([a[k].x for k in ("train", "val", "test")])
    assert len(torch.unique(rows, dim=0)) >= 1790 and float(rows.max()) == 1.0  # (the set has a few duplicates)
    assert torch.bincount(a["test"].y).min() >= 70  # every digit is in the test split
    b = classifier_kd.load_digits_splits(0, 0.4, 0.15)
    assert torch.equal(a["test"].x, b["test"].x)
    assert not torch.equal(a["test"].x, classifier_kd.load_digits_splits(1, 0.4, 0.15)["test"].x)


def test_ensemble_is_the_mean_of_member_log_probs():
    z1, z2 = torch.randn(5, 10), torch.randn(5, 10)
    ens = classifier_kd.ensemble_logits([z1, z2])
    assert torch.allclose(ens, (torch.log_softmax(z1, -1) + torch.log_softmax(z2, -1)) / 2)
    assert torch.allclose(torch.softmax(classifier_kd.ensemble_logits([z1 + 3.0]), -1), torch.softmax(z1, -1))


def test_a_student_learns_from_hard_labels_and_from_soft_targets():
    data = classifier_kd.load_digits_splits(0, 0.4, 0.15)
    training = classifier_kd.Training(epochs=5, batch_size=64, learning_rate=3e-3)
    teacher = classifier_kd.mlp(64, [64], 10, 0.0, seed=0)
    classifier_kd.train(teacher, data["train"], training, seed=0)
    soft = classifier_kd.predict_logits(teacher, data["train"].x)
    student = classifier_kd.mlp(64, [16], 10, 0.0, seed=1)
    history = classifier_kd.train(
        student, data["train"], training, seed=1, teacher_logits=soft, alpha=0.1, temperature=4.0
    )
    assert history[-1] < history[0]
    assert (
        classifier_kd.accuracy(classifier_kd.predict_logits(student, data["test"].x), data["test"].y)["accuracy"] > 0.5
    )
    # the same seed gives the same student
    again = classifier_kd.mlp(64, [16], 10, 0.0, seed=1)
    assert (
        classifier_kd.train(again, data["train"], training, seed=1, teacher_logits=soft, alpha=0.1, temperature=4.0)
        == history
    )


def test_spread_is_mean_and_sample_std():
    s = classifier_kd.spread([10, 12, 14])
    assert s["mean"] == 12 and s["std"] == pytest.approx(2.0) and s["values"] == [10, 12, 14]
    assert classifier_kd.spread([3])["std"] == 0.0


# ---- the transformers path ------------------------------------------------------------------------------


def test_generated_reviews_are_deterministic_balanced_and_need_word_order():
    rows = classifier_hf.generate_reviews(2000, seed=3)
    assert rows == classifier_hf.generate_reviews(2000, seed=3) and rows != classifier_hf.generate_reviews(2000, 4)
    assert 0.45 < sum(r["label"] for r in rows) / len(rows) < 0.55
    # the same adjective appears under both labels (negation, "but"): a bag of words cannot read the label
    good = [r["label"] for r in rows if " good" in r["text"]]
    assert 0.2 < sum(good) / len(good) < 0.8
    tokenizer = classifier_hf.word_tokenizer()
    ids = tokenizer([r["text"] for r in rows])["input_ids"]
    assert max(map(len, ids)) <= classifier_hf.MAX_LENGTH and tokenizer.unk_token_id not in sum(ids, [])


def test_hinton_trainer_uses_the_shared_loss_and_trains_a_sequence_classifier(tmp_path):
    tokenizer = classifier_hf.word_tokenizer()
    splits, _ = classifier_hf.load_review_splits(200, 0, 0.3, 0.15, tokenizer)
    train, pad = splits["train"], tokenizer.pad_token_id
    teacher_logits = torch.randn(len(train), 2)
    student = classifier_hf.sequence_classifier(tokenizer, 16, 1, 2, 32, seed=0)
    args = classifier_hf.training_arguments({"max_steps": 3, "per_device_train_batch_size": 16}, str(tmp_path), 0)
    trainer = classifier_hf.HintonTrainer(model=student, args=args, alpha=0.3, temperature=2.0)
    batch = {
        "input_ids": train.x[:8],
        "attention_mask": (train.x[:8] != pad).long(),
        "labels": train.y[:8],
        "teacher_logits": teacher_logits[:8],
    }
    student.eval()
    loss = trainer.compute_loss(student, batch)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert loss.item() == pytest.approx(hinton_loss(logits, teacher_logits[:8], train.y[:8], 0.3, 2.0).item(), rel=1e-5)

    history = classifier_hf.train_classifier(
        student,
        train,
        pad,
        {"max_steps": 3, "per_device_train_batch_size": 16, "logging_steps": 1},
        tmp_path,
        0,
        teacher_logits=teacher_logits,
        alpha=0.3,
        temperature=2.0,
    )
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert classifier_hf.predict_logits(student, splits["test"].x, pad).shape == (len(splits["test"]), 2)


# ---- the flows, on the miniature recipe -----------------------------------------------------------------


def read_artifacts(keys: list[str]) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    return {a.key: a for a in asyncio.run(read())}


def stage_folders(run_dir: Path) -> dict[str, set[str]]:
    return {
        stage: {p.name for p in (run_dir / stage).iterdir() if not p.name.startswith(".")}  # not lock files
        for stage in ("classifier-data", "classifier-teacher", "classifier-student")
    }


@pytest.mark.slow
def test_distill_classifier_then_sweep_on_the_miniature_recipe(prefect_server, mini):
    from flows.classifier_sweep import classifier_sweep
    from flows.distill_classifier import distill_classifier

    recipe = load_classifier_recipe(mini)
    run_dir = recipe.run_dir
    report = distill_classifier(str(mini))

    assert json.loads((run_dir / "report.json").read_text()) == report
    assert set(report["models"]) == {"teacher", "ensemble of 2", "hard-label student", "KD student"}
    for m in report["models"].values():
        assert len(m["test_errors"]["values"]) == 2 and 0 <= m["test_accuracy"]["mean"] <= 1
    assert report["models"]["KD student"]["teacher_size_ratio"] >= 10
    assert "| KD student |" in (run_dir / "report.md").read_text()
    assert (run_dir / "report.png").read_bytes().startswith(b"\x89PNG")
    folders = stage_folders(run_dir)
    # one data split; 2 seeds x 2 members; 2 seeds x (hard-label + KD) x (all classes, no 3s); every one complete
    assert [len(folders[s]) for s in folders] == [1, 4, 8]
    # Hinton's omitted class: both students without 3s, the bias raise chosen on val, in json and md
    section = report["omitted_class"]
    assert section["label"] == 3 and section["seeds"] == [0, 1] and section["bias_chosen_on"] == "val"
    assert set(section["students"]) == {"hard-label student", "KD student"}
    assert set(section["references"]) == {"ensemble of 2", "KD student (all classes)"}
    for s in section["students"].values():
        assert len(s["class_errors"]["values"]) == 2 and min(s["bias"]["values"]) >= 0
    manifests = [
        json.loads((run_dir / "classifier-student" / f / "manifest.json").read_text())
        for f in folders["classifier-student"]
    ]
    no_threes = [m for m in manifests if m["omit_class"] == 3]
    # the training split has 808 images, 82 of them 3s
    assert len(no_threes) == 4 and {m["rows"] for m in no_threes} == {section["transfer_rows"]} == {808 - 82}
    assert {m["rows"] for m in manifests if m["omit_class"] is None} == {808}
    assert "## Omitted class: no 3s" in (run_dir / "report.md").read_text()
    assert all((run_dir / s / f / "manifest.json").is_file() for s in folders for f in folders[s])

    sweep = classifier_sweep(str(mini))
    assert len(sweep["grid"]) == 2 * 1 * 2  # ensemble sizes x alphas x temperatures
    assert set(sweep["references"]) == {"teacher", "ensemble of 2", "hard-label student"}
    assert (run_dir / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert "Best on the validation split" in (run_dir / "sweep-report.md").read_text()
    after = stage_folders(run_dir)
    assert after["classifier-teacher"] == folders["classifier-teacher"]  # the sweep reused the teachers
    # new students: 2 seeds x 4 grid points, less the one that is the distill flow's own (ensemble 2, T 4)
    assert len(after["classifier-student"] - folders["classifier-student"]) == 2 * 3

    artifacts = read_artifacts(
        [
            "classifier-mini-report",
            "classifier-mini-table",
            "classifier-mini-sweep-report",
            "classifier-mini-sweep-table",
        ]
    )
    assert set(artifacts) == {
        "classifier-mini-report",
        "classifier-mini-table",
        "classifier-mini-sweep-report",
        "classifier-mini-sweep-table",
    }
    assert "Classic KD report: classifier-mini" in artifacts["classifier-mini-report"].data
    assert "data:image/png;base64," in artifacts["classifier-mini-sweep-report"].data


@pytest.mark.slow
def test_distill_classifier_through_transformers_on_generated_reviews(prefect_server, mini):
    from flows.distill_classifier import distill_classifier

    text = mini.read_text()
    head = text[: text.index("teacher:")].replace("source: digits", "source: reviews\n  rows: 300")
    mini.write_text(
        head
        + """
teacher:
  model: {kind: transformer, hidden: 64, layers: 1, heads: 2, intermediate: 128,
          training: {max_steps: 4, per_device_train_batch_size: 32}}
student:
  model: {kind: transformer, hidden: 8, layers: 1, heads: 2, intermediate: 8,
          training: {max_steps: 4, per_device_train_batch_size: 32}}
distill: {temperature: 2.0, alpha: 0.5}
seeds: [0]
"""
    )
    report = distill_classifier(str(mini))
    run_dir = load_classifier_recipe(mini).run_dir
    assert report["data"]["source"] == "reviews"
    assert report["models"]["KD student"]["teacher_size_ratio"] >= 10
    data = next(p for p in (run_dir / "classifier-data").iterdir() if not p.name.startswith("."))
    assert (data / "tokenizer" / "tokenizer.json").is_file() and (data / "rows.jsonl").is_file()
    assert all(
        (p / "model" / "config.json").is_file()
        for p in (run_dir / "classifier-student").iterdir()
        if not p.name.startswith(".")
    )


def test_sweep_without_a_sweep_section_is_refused_before_any_work(prefect_server, mini):
    from flows.classifier_sweep import classifier_sweep

    text = mini.read_text()
    mini.write_text(text[: text.index("sweep:")])
    with pytest.raises(RecipeError, match="no `sweep` section"):
        classifier_sweep(str(mini))
    assert not (mini.parent / "runs").exists()
