"""A student's ``kd`` section (kdflow/config/kd.py): one model per method, told apart by ``method``. Each takes only
its own settings, a section without ``method`` is offline, and a student's cache key does not depend on how the
section is modelled: the dicts below pin the keys of one section shared by every method (computed at commit 87dff60)."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from kdflow.config.kd import FeatureKD, OfflineKD, OnlineKD
from kdflow.config.loading import RecipeError
from kdflow.config.student import StudentSection
from kdflow.store.outputs import canonical
from tests.config.test_recipe import error_of, line_of

DEMO = (Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml").read_text()
ARCH = {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128}
# kd section as written -> its part of the student's canonical dict (the key's input), as at 87dff60
KEYED = [
    ({"divergence": "reverse_kl", "temperature": 2.0}, {"divergence": "reverse_kl", "temperature": 2.0}),
    ({"method": "offline", "divergence": "forward_kl", "alpha": 0.5, "temperature": 1.0}, {}),
    ({"divergence": "skew_kl", "skew": 0.2, "alpha": 0.7}, {"alpha": 0.7, "divergence": "skew_kl", "skew": 0.2}),
    (
        {"method": "online", "divergence": "jsd", "beta": 0.2, "lmbda": 0.7, "max_new_tokens": 64},
        {"beta": 0.2, "divergence": "jsd", "lmbda": 0.7, "max_new_tokens": 64, "method": "online"},
    ),
    (
        {"method": "online", "divergence": "jsd", "cross_tokenizer": "gold"},
        {"cross_tokenizer": "gold", "divergence": "jsd", "method": "online"},
    ),
    ({"method": "feature", "feature": {}}, {"feature": {}, "method": "feature"}),
    (
        {"method": "feature", "feature": {"layers": [[1, 2]], "kind": "cosine", "weight": 0.5}},
        {"feature": {"kind": "cosine", "layers": [[1, 2]], "weight": 0.5}, "method": "feature"},
    ),
]


@pytest.mark.parametrize("kd, keyed", KEYED, ids=lambda v: str(v)[:40])
def test_a_students_key_is_what_it_was_before_each_method_had_its_own_model(kd, keyed):
    section = StudentSection(name="s", data="teacher", architecture=ARCH, kd=kd)
    assert canonical(section) == {"architecture": ARCH, "data": "teacher", "kd": keyed, "name": "s"}


def test_each_method_is_its_own_model_and_offline_is_the_default():
    assert isinstance(StudentSection(name="s", data="teacher", architecture=ARCH, kd={"alpha": 0.3}).kd, OfflineKD)
    online = StudentSection(name="s", data="teacher", architecture=ARCH, kd={"method": "online", "divergence": "jsd"})
    assert isinstance(online.kd, OnlineKD) and online.kd.lmbda == 0.5
    feature = StudentSection(name="s", data="teacher", architecture=ARCH, kd=FeatureKD(method="feature", feature={}))
    assert feature.kd.feature.kind == "mse" and feature.summary()["kd"] == "feature"
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        OfflineKD(lmbda=0.5)  # built in Python, extra="forbid" still refuses another method's setting


def test_a_setting_of_another_method_is_refused_at_its_line_naming_the_method():
    line = line_of(DEMO, "divergence: reverse_kl")
    lmbda = DEMO.replace(
        "kd: {method: offline, divergence: reverse_kl", "kd: {method: offline, lmbda: 0.7, divergence: reverse_kl"
    )
    assert (
        f"demo.yaml:{line}: students.3.kd.lmbda: not a setting of kd method offline; remove it, or set method: online"
    ) in error_of(lmbda)
    feature = DEMO.replace(
        "kd: {method: offline, divergence: reverse_kl", "kd: {method: feature, feature: {}, divergence: reverse_kl"
    )
    assert (
        "students.3.kd.divergence: not a setting of kd method feature; remove it, or set method: offline"
        in error_of(feature)
    )
    typo = DEMO.replace("kd: {method: offline, divergence: reverse_kl", "kd: {method: offline, divergance: reverse_kl")
    assert "students.3.kd.divergance: not a setting of kd method offline; remove it or check its spelling" in error_of(
        typo
    )
    assert "students.3.kd: method 'distil': use one of ['offline', 'online', 'feature', 'on_policy']" in error_of(
        DEMO.replace("method: offline, divergence: reverse_kl", "method: distil, divergence: reverse_kl")
    )


def test_feature_errors_name_the_feature_field_not_the_union_tag():
    # the tag of the feature method and its own `feature` field share a name: the path keeps the field
    text = DEMO.replace(
        "kd: {method: offline, divergence: reverse_kl, alpha: 0.5, temperature: 1.0}",
        "kd:\n      method: feature\n      feature:\n        kind: l1",
    )
    kind_line = next(i for i, line in enumerate(text.splitlines(), 1) if "kind: l1" in line)
    assert f"demo.yaml:{kind_line}: students.3.kd.feature.kind: Input should be 'mse' or 'cosine'" in error_of(text)
    missing = DEMO.replace(
        "kd: {method: offline, divergence: reverse_kl, alpha: 0.5, temperature: 1.0}", "kd: {method: feature}"
    )
    assert "students.3.kd.feature: required field is missing; add it" in error_of(missing)


def test_a_sweep_method_takes_the_same_sections(tmp_path):
    from kdflow.config.sweep import load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "recipe: recipes/demo.yaml\nstudent: seq-kd\nfractions: [1.0]\nseeds: [0]\n"
        "methods:\n  seq-kd: null\n  fkl: {temperature: 2.0}\n  gkd: {method: online, divergence: jsd, alpha: 0.5}\n"
    )
    with pytest.raises(RecipeError, match=rf"{sweep}:8: methods\.gkd\.alpha: not a setting of kd method online"):
        load_sweep(sweep)
    sweep.write_text(sweep.read_text().replace(", alpha: 0.5", ""))
    students = {s.name: s.kd for s in load_sweep(sweep).students()}
    assert isinstance(students["fkl-1@0"], OfflineKD) and isinstance(students["gkd-1@0"], OnlineKD)


# kd section -> the config its trainer is handed: its class, and the settings it must carry over by name
CONFIGS = [
    (None, "SFTConfig", {}),
    (
        {"divergence": "jsd", "alpha": 0.3, "temperature": 2.0, "beta": 0.2, "skew": 0.3},
        "OfflineKDConfig",
        {"divergence": "jsd", "alpha": 0.3, "temperature": 2.0, "beta": 0.2, "skew": 0.3},
    ),
    (
        {"method": "on_policy", "k": 7, "temperature": 0.7, "overlap": True, "max_new_tokens": 9},
        "OnPolicyConfig",
        {"divergence": "reverse_kl", "k": 7, "temperature": 0.7, "overlap": True, "max_new_tokens": 9, "lmbda": 1.0},
    ),
    (
        {"method": "online", "divergence": "jsd", "beta": 0.2, "lmbda": 0.7, "temperature": 0.9, "max_new_tokens": 9},
        "GKDConfig",
        {"beta": 0.2, "lmbda": 0.7, "temperature": 0.9, "max_new_tokens": 9},
    ),
    (
        {"method": "online", "divergence": "jsd", "cross_tokenizer": "gold", "lmbda": 0.3, "max_new_tokens": 9},
        "GOLDConfig",
        {"lmbda": 0.3, "max_completion_length": 9, "use_uld_loss": True},
    ),
    (
        {"method": "feature", "feature": {"layers": [[1, 1]], "kind": "cosine", "weight": 0.5}},
        "FeatureKDConfig",
        {"feature_layers": [(1, 1)], "feature_loss": "cosine", "feature_weight": 0.5},
    ),
]


@pytest.mark.parametrize("kd, config_class, settings", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_fit_student_hands_each_trainer_one_config_built_from_the_section(
    kd, config_class, settings, tmp_path, monkeypatch
):
    """The one place a method's config is built from its recipe section: the trainer gets it whole, with the
    section's settings, its training keys, its seed, and the checkpoint folder the stage keeps between attempts."""
    from transformers import TrainingArguments

    import kdflow.training.feature_kd
    import kdflow.training.gold
    import kdflow.training.offline_kd
    import kdflow.training.on_policy
    import kdflow.training.online_kd
    import kdflow.training.student as student
    from kdflow.store.model_folders import write_location
    from tests.logit_cache.test_capture import stage_ref, tiny_teacher

    handed = []
    record = lambda *args, **kw: handed.extend(a for a in args if isinstance(a, TrainingArguments))
    monkeypatch.setattr(student, "train_sft", record)
    for module, name in [
        (kdflow.training.offline_kd, "train_offline_kd"),
        (kdflow.training.on_policy, "train_on_policy"),
        (kdflow.training.online_kd, "train_online"),
        (kdflow.training.gold, "train_gold"),
        (kdflow.training.feature_kd, "train_feature_kd"),
    ]:
        monkeypatch.setattr(module, name, record)
    _, tokenizer = tiny_teacher(tmp_path / "teacher-model")
    teacher = stage_ref(tmp_path / "run", "teacher", lambda d: write_location(d, str(tmp_path / "teacher-model")))
    logits = stage_ref(tmp_path / "run", "logit-cache", lambda d: None)
    section = StudentSection(
        name="s", data="teacher", architecture=ARCH, seed=3, training={"max_steps": 7, "learning_rate": 1e-3}, kd=kd
    )
    rows = [{"row_id": "r0", "prompt": [{"role": "user", "content": "1+1"}], "completion": []}]
    student.fit_student(None, tokenizer, section, rows, teacher, logits, tmp_path / "out", tmp_path / "ckpt")
    [config] = handed
    assert type(config).__name__ == config_class
    got = {k: v.value if hasattr(v, "value") else v for k, v in vars(config).items() if k in settings}
    assert got == settings
    assert (config.max_steps, config.learning_rate, config.seed) == (7, 1e-3, 3)
    assert config.output_dir == str(tmp_path / "ckpt") and config.save_strategy == "steps"
    if config_class == "OfflineKDConfig":
        assert config.logit_cache == str(logits.path) and config.remove_unused_columns is False
    if config_class in ("OnPolicyConfig", "GOLDConfig"):
        teacher_dir = config.teacher if config_class == "OnPolicyConfig" else config.teacher_tokenizer_name_or_path
        assert teacher_dir == str(tmp_path / "teacher-model")
