from pathlib import Path

import pytest

from kdflow.recipe import RecipeError, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
# LLM distillation recipes; the classic-KD recipes (classifier-*.yaml) have their own loader and tests.
SHIPPED = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("classifier-"))
SHIPPED += [ROOT / "tests" / "mini.yaml"]
DEMO = (ROOT / "recipes" / "demo.yaml").read_text()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.students and recipe.run.name


def test_demo_students_are_at_least_10x_smaller_than_the_teacher():
    from kdflow.tiny_models import count_params, llama_model, train_tokenizer

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    tok = train_tokenizer(["1+2=3\nAnswer: 3", "Solve step by step: 45-12+7"], recipe.teacher.vocab_size)
    size = lambda a: count_params(llama_model(tok, a.hidden, a.layers, a.heads, a.intermediate, seed=0))
    teacher = size(recipe.teacher.architecture)
    for student in recipe.students:
        assert teacher >= 10 * size(student.architecture)


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "demo.yaml")
    return str(e.value)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_unknown_field_names_field_line_and_fix():
    text = DEMO.replace("  max_new_tokens: 96\n  batch_size: 512\n\nfilters", "  max_new_token: 96\n  batch_size: 512\n\nfilters")
    msg = error_of(text)
    assert f"demo.yaml:{line_of(text, 'max_new_token:')}: generation.max_new_token: unknown field" in msg
    assert "spelling" in msg


def test_missing_section_is_named():
    text = DEMO.replace("teacher:\n  architecture", "teacher_:\n  architecture")
    msg = error_of(text)
    assert "teacher: required field is missing" in msg and "teacher_: unknown field" in msg


def test_bad_head_dimension_says_what_to_use():
    msg = error_of(DEMO.replace("hidden: 128, layers: 4, heads: 4", "hidden: 128, layers: 4, heads: 8"))
    assert "teacher.architecture" in msg and "head dimension hidden/heads = 16" in msg and "use 32, 64 or 128" in msg


def test_trl_validates_training_knobs():
    text = DEMO.replace("    learning_rate: 3.0e-3\n    lr_scheduler_type: cosine\n    warmup_steps: 50\n    max_length: 128\n\ngeneration",
                        "    learnin_rate: 3.0e-3\n    lr_scheduler_type: cosine\n    warmup_steps: 50\n    max_length: 128\n\ngeneration")
    msg = error_of(text)
    assert "teacher.training" in msg and "learnin_rate" in msg and "trl.SFTConfig" in msg
    msg = error_of(DEMO.replace("lr_scheduler_type: cosine", "lr_scheduler_type: cosinus", 1))
    assert "teacher.training: TRL rejected these settings" in msg and "cosinus" in msg


def test_students_must_not_train_on_the_test_split():
    msg = error_of(DEMO.replace("splits: [train, prompts]", "splits: [train, test]"))
    assert "generation.splits includes the evaluation split 'test'" in msg


def test_unknown_split_and_duplicate_students():
    assert "split 'valid' is not in data.splits" in error_of(DEMO.replace("  split: test", "  split: valid"))
    assert "students.name must be unique" in error_of(DEMO.replace("name: seq-kd", "name: baseline"))


def test_not_yaml_and_not_a_mapping():
    assert "not valid YAML" in error_of("run: [unclosed")
    assert "a recipe is a YAML mapping" in error_of("- 1\n- 2\n")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_throughput_knobs_are_not_content():
    from kdflow.outputs import canonical

    a = parse_recipe(DEMO)
    b = parse_recipe(DEMO.replace("batch_size: 512", "batch_size: 64"))
    assert canonical(a.generation) == canonical(b.generation)
    assert canonical(a.generation) != canonical(parse_recipe(DEMO.replace("max_new_tokens: 96", "max_new_tokens: 97", 1)).generation)


def test_kd_students_are_checked_before_any_work():
    no_cache = DEMO.replace("logit_cache:\n  k: 20\n", "")
    assert "logit-fkl" in error_of(no_cache) and "add a `logit_cache:` section" in error_of(no_cache)
    gold = DEMO.replace("  - name: logit-fkl         # forward KL(teacher ‖ student): Hinton's soft targets\n    data: teacher",
                        "  - name: logit-fkl\n    data: gold")
    assert "set data: teacher" in error_of(gold)
    online = DEMO.replace("kd: {method: offline, divergence: forward_kl", "kd: {method: online, divergence: forward_kl")
    assert "set divergence: jsd" in error_of(online)
    bad = DEMO.replace("divergence: reverse_kl", "divergence: kl")
    message = error_of(bad)
    assert f"demo.yaml:{line_of(DEMO, 'divergence: reverse_kl')}: students.3.kd.divergence" in message
    assert "'forward_kl'" in message  # the choices are named


def test_seeds_train_every_student_once_per_seed():
    recipe = parse_recipe(DEMO.replace("  name: demo\n", "  name: demo\n  seeds: [0, 1, 2]\n"))
    runs = recipe.student_runs()
    assert [s.name for s in runs[:3]] == ["baseline@0", "baseline@1", "baseline@2"] and len(runs) == 12
    assert [s.seed for s in runs[:3]] == [0, 1, 2] and runs[5].kd is None and runs[7].kd.divergence.value == "forward_kl"
    # `python -m flows.distill recipes/demo.yaml --seeds 0 1 2`: the same students, the same run folder
    plain = parse_recipe(DEMO)
    assert plain.with_seeds([0, 1, 2]).student_runs() == runs and plain.with_seeds([0, 1, 2]).run_dir == plain.run_dir
    assert plain.student_runs()[0].name == "baseline"  # the recipe itself is unchanged


def test_vllm_tensor_parallel_size_reaches_the_server_flags_and_not_the_cache_key():
    from kdflow.outputs import canonical

    gpu = (ROOT / "recipes" / "gsm8k-qwen7b-to-0.5b.yaml").read_text()
    one = parse_recipe(gpu).generation
    four = parse_recipe(gpu.replace("tensor_parallel_size: 1", "tensor_parallel_size: 4")).generation
    assert one.vllm.server_args() == ["--dtype", "bfloat16"]
    assert four.vllm.server_args() == ["--dtype", "bfloat16", "--tensor-parallel-size", "4"]
    assert canonical(one) == canonical(four)  # the same answers, only served faster
    both = gpu.replace("extra_args: [--dtype, bfloat16]", "extra_args: [--tensor-parallel-size, '2']")
    with pytest.raises(RecipeError, match="set tensor_parallel_size, not --tensor-parallel-size"):
        parse_recipe(both)
