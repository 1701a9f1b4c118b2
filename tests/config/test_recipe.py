import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]
# LLM distillation recipes; the classic-KD recipes (classifier-*.yaml) have their own loader and tests.
SHIPPED = sorted(p for p in (ROOT / "recipes").glob("*.yaml") if not p.name.startswith("classifier-"))
SHIPPED += [ROOT / "tests" / "mini.yaml"]
DEMO = (ROOT / "recipes" / "demo.yaml").read_text()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    if "models/SmolLM2-135M-Instruct.Q4_1.gguf" in path.read_text():  # what `make smollm2` (and make test) links
        from kdflow.models.smollm2 import link

        link(ROOT)
    recipe = load_recipe(path)
    assert recipe.students and recipe.run.name


def test_demo_students_are_at_least_10x_smaller_than_the_teacher():
    from kdflow.training.tiny_models import count_params, llama_model, train_tokenizer

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
    text = DEMO.replace(
        "  max_new_tokens: 96\n  batch_size: 512\n\nfilters", "  max_new_token: 96\n  batch_size: 512\n\nfilters"
    )
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
    text = DEMO.replace(
        "    learning_rate: 3.0e-3\n    lr_scheduler_type: cosine\n"
        "    warmup_steps: 50\n    max_length: 128\n\ngeneration",
        "    learnin_rate: 3.0e-3\n    lr_scheduler_type: cosine\n"
        "    warmup_steps: 50\n    max_length: 128\n\ngeneration",
    )
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
    from kdflow.store.outputs import canonical

    a = parse_recipe(DEMO)
    b = parse_recipe(DEMO.replace("batch_size: 512", "batch_size: 64"))
    assert canonical(a.generation) == canonical(b.generation)
    assert canonical(a.generation) != canonical(
        parse_recipe(DEMO.replace("max_new_tokens: 96", "max_new_tokens: 97", 1)).generation
    )


def test_kd_students_are_checked_before_any_work():
    no_cache = DEMO.replace("logit_cache:\n  k: 20\n", "")
    assert "logit-fkl" in error_of(no_cache) and "add a `logit_cache:` section" in error_of(no_cache)
    gold = DEMO.replace(
        "  - name: logit-fkl         # forward KL(teacher ‖ student): Hinton's soft targets\n    data: teacher",
        "  - name: logit-fkl\n    data: gold",
    )
    assert "set data: teacher" in error_of(gold)
    online = DEMO.replace(
        "kd: {method: offline, divergence: forward_kl, alpha: 0.5", "kd: {method: online, divergence: forward_kl"
    )
    assert "set divergence: jsd" in error_of(online)
    # GKD has no cross-entropy weight: an online section that keeps offline's alpha is told so, at alpha's line
    online = DEMO.replace("kd: {method: offline, divergence: forward_kl", "kd: {method: online, divergence: jsd")
    line = line_of(DEMO, "divergence: forward_kl")
    assert (
        f"demo.yaml:{line}: students.2.kd.alpha: not a setting of kd method online; remove it, or set method: offline"
        in error_of(online)
    )
    bad = DEMO.replace("divergence: reverse_kl", "divergence: kl")
    message = error_of(bad)
    assert f"demo.yaml:{line_of(DEMO, 'divergence: reverse_kl')}: students.3.kd.divergence" in message
    assert "'forward_kl'" in message  # the choices are named


def test_seeds_train_every_student_once_per_seed():
    recipe = parse_recipe(DEMO.replace("  name: demo\n", "  name: demo\n  seeds: [0, 1, 2]\n"))
    runs = recipe.student_runs()
    assert [s.name for s in runs[:3]] == ["baseline@0", "baseline@1", "baseline@2"] and len(runs) == 12
    assert (
        [s.seed for s in runs[:3]] == [0, 1, 2] and runs[5].kd is None and runs[7].kd.divergence.value == "forward_kl"
    )
    # `python -m flows.distill recipes/demo.yaml --seeds 0 1 2`: the same students, the same run folder
    plain = parse_recipe(DEMO)
    assert plain.with_seeds([0, 1, 2]).student_runs() == runs and plain.with_seeds([0, 1, 2]).run_dir == plain.run_dir
    assert plain.student_runs()[0].name == "baseline"  # the recipe itself is unchanged
    # `--students seq-kd baseline`: those two, in the recipe's order, each section unchanged (its stage key too)
    picked = plain.with_students(["seq-kd", "baseline"])
    assert [s.name for s in picked.students] == ["baseline", "seq-kd"] and picked.students[0] == plain.students[0]
    assert [s.name for s in picked.with_seeds([1, 2]).student_runs()] == [
        "baseline@1",
        "baseline@2",
        "seq-kd@1",
        "seq-kd@2",
    ]
    with pytest.raises(ValueError, match=r"--students nope: no such student in the recipe; its students are baseline"):
        plain.with_students(["seq-kd", "nope"])


def test_vllm_tensor_parallel_size_reaches_the_server_flags_and_not_the_cache_key():
    from kdflow.store.outputs import canonical

    gpu = (ROOT / "recipes" / "gsm8k-qwen7b-to-0.5b.yaml").read_text()
    one = parse_recipe(gpu).generation
    four = parse_recipe(gpu.replace("tensor_parallel_size: 1", "tensor_parallel_size: 4")).generation
    assert one.vllm.server_args() == ["--dtype", "bfloat16"]
    assert four.vllm.server_args() == ["--dtype", "bfloat16", "--tensor-parallel-size", "4"]
    assert canonical(one) == canonical(four)  # the same answers, only served faster
    both = gpu.replace("extra_args: [--dtype, bfloat16]", "extra_args: [--tensor-parallel-size, '2']")
    with pytest.raises(RecipeError, match="set tensor_parallel_size, not --tensor-parallel-size"):
        parse_recipe(both)


# ---- names, files and interpreters a recipe names stay where they belong (reliability issue, item 5) ---------


def a_recipe_file(tmp_path: Path, text: str) -> Path:
    """``text`` as recipes/r.yaml under ``tmp_path``, its run folder under tmp_path/runs."""
    path = tmp_path / "recipes" / "r.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("  name: demo\n", f"  name: demo\n  root: {tmp_path / 'runs'}\n", 1))
    return path


def test_a_split_name_that_climbs_out_is_refused_at_its_line(tmp_path):
    text = DEMO.replace("    prompts: 8000 ", "    ../../../escaped: 8000 ")
    path = a_recipe_file(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert (
        f"{path}:{line_of(path.read_text(), '../../../escaped')}: data.splits.../../../escaped: split name "
        f"'../../../escaped': use letters, digits"
    ) in str(e.value)
    assert "it becomes a file name" in str(e.value)
    for bad in ["/etc/x", ".hidden", "a/b", "..", ""]:
        assert "split name" in error_of(DEMO.replace("    prompts: 8000 ", f"    '{bad}': 8000 ")), bad
    assert not list(tmp_path.parent.glob("escaped*")) and not (tmp_path / "runs").exists()


def test_student_and_sweep_method_names_are_path_safe():
    assert "student name '../x'" in error_of(DEMO.replace("name: seq-kd", "name: ../x"))
    assert "students.1.name" in error_of(DEMO.replace("name: seq-kd", "name: a/b"))
    assert "'@' is followed by the seed only" in error_of(DEMO.replace("name: seq-kd", "name: a@b"))
    seeded = parse_recipe(DEMO.replace("  name: demo\n", "  name: demo\n  seeds: [3]\n")).student_runs()[0]
    assert type(seeded).model_validate(seeded.model_dump(exclude_computed_fields=True)).name == "baseline@3"
    msg = error_of(DEMO.replace("splits: [train, prompts]", "splits: [train, ../prompts]"))
    assert "generation.splits.1" in msg and "'../prompts'" in msg


def test_a_sweep_method_name_that_is_no_file_name_is_refused(tmp_path):
    from kdflow.config.sweep import load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "recipe: recipes/demo.yaml\nstudent: seq-kd\nfractions: [1.0]\nseeds: [0]\n"
        "methods:\n  seq-kd: null\n  ../up: {method: offline}\n"
    )
    with pytest.raises(RecipeError, match=rf"{sweep}:7: methods\.\.\./up: method name '\.\./up': use letters"):
        load_sweep(sweep)


@pytest.mark.parametrize("template", ["/etc/passwd", "../../../../../../etc/passwd", "prompts/../../outside.jinja"])
def test_a_template_outside_the_project_and_the_recipe_folder_is_refused(tmp_path, template):
    text = DEMO.replace("  cot: prompts/cot.jinja", f"  cot: {template}")
    path = a_recipe_file(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert (
        f"{path}:{line_of(path.read_text(), '  cot:')}: prompts.cot: "
        f"template '{template}' is outside the project folder"
    ) in str(e.value)
    assert "and the recipe's folder" in str(e.value) and "copy it under prompts/" in str(e.value)
    assert "root:x:0:0" not in str(e.value)
    judge = DEMO.replace(
        "filters:\n  correctness: true\n", f"filters:\n  correctness: true\n  judge: {{template: {template}}}\n"
    )
    assert "filters.judge.template: template" in error_of(judge)


def test_a_template_beside_the_recipe_is_read(tmp_path):
    mine = tmp_path / "recipes" / "mine.jinja"
    path = a_recipe_file(tmp_path, DEMO.replace("  cot: prompts/cot.jinja", f"  cot: {mine}"))
    mine.write_text("Q: {{ question }}")
    assert load_recipe(path).prompts.cot_text() == "Q: {{ question }}"
    with pytest.raises(RecipeError, match="outside the project folder"):  # the same text, with no file to be beside
        parse_recipe(path.read_text(), "r.yaml")


def test_templates_render_in_a_sandbox():
    import jinja2

    from kdflow.config.templates import render

    assert render("Q: {{ question }}", question="{{ 7*7 }}") == "Q: {{ 7*7 }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    rows = [{"q": 1}]
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ rows.append(2) }}", rows=rows)
    assert rows == [{"q": 1}]


def test_the_vllm_interpreter_must_be_a_python(tmp_path):
    gpu = (ROOT / "recipes" / "gsm8k-qwen7b-to-0.5b.yaml").read_text()
    assert "python:" not in gpu
    vllm = "  vllm: {tensor_parallel_size: 1, "
    text = gpu.replace(vllm, "  vllm: {python: /bin/sh, tensor_parallel_size: 1, ")
    msg = error_of(text)
    assert f"demo.yaml:{line_of(text, 'python: /bin/sh')}: generation.vllm.python: '/bin/sh' is not a Python" in msg
    assert ".venv-vllm/bin/python" in msg
    assert parse_recipe(gpu.replace(vllm, "  vllm: {python: /opt/vllm/bin/python3.12, "))

    from kdflow.teacher.vllm_server import VllmServerError, check_python, vllm_server

    fake = tmp_path / "bin" / "python"  # named like one, but a shell
    fake.parent.mkdir()
    fake.symlink_to("/bin/sh")
    with pytest.raises(VllmServerError, match=r"is not a Python 3 .*point generation.vllm.python"):
        check_python(fake)
    with pytest.raises(VllmServerError, match=r"/bin/sh is not a Python interpreter"):
        with vllm_server(tmp_path / "model", python="/bin/sh"):
            pass
    check_python(Path(sys.executable))


# ---- bad values refused at load, not left to fail later (reliability issue, item 9) -------------------------------


def test_training_numbers_are_checked_where_they_are_written():
    teacher_lr = (
        "    learning_rate: 3.0e-3\n    lr_scheduler_type: cosine\n    warmup_steps: 50\n    max_length: 128\n\ngen"
    )
    text = DEMO.replace(teacher_lr, teacher_lr.replace("3.0e-3", "abc"))
    assert (
        f"demo.yaml:{line_of(text, 'learning_rate: abc')}: teacher.training.learning_rate: 'abc' is not a float"
        in error_of(text)
    )
    text = DEMO.replace("      max_steps: 1500", "      max_steps: -5")
    msg = error_of(text)
    assert f"demo.yaml:{line_of(text, 'max_steps: -5')}: students.0.training.max_steps: -5: must be a positive" in msg
    assert "(or -1: train num_train_epochs)" in msg
    msg = error_of(DEMO.replace("      learning_rate: 3.0e-3", "      learning_rate: 3e-3"))
    assert (
        "students.0.training.learning_rate: '3e-3' is not a float (YAML reads 3e-3 as text: write it with a dot" in msg
    )
    assert "students.0.training.learning_rate: 0: must be > 0" in error_of(
        DEMO.replace("      learning_rate: 3.0e-3", "      learning_rate: 0")
    )
    assert "per_device_train_batch_size: 0: must be >= 1" in error_of(
        DEMO.replace("      per_device_train_batch_size: 64", "      per_device_train_batch_size: 0")
    )
    assert "max_steps: 'many' is not a int" in error_of(DEMO.replace("      max_steps: 1500", "      max_steps: many"))
    assert parse_recipe(DEMO.replace("      max_steps: 1500", "      max_steps: -1\n      num_train_epochs: 2"))


def test_classifier_training_arguments_are_checked_too():
    from kdflow.config.classic import parse_classifier_recipe

    text = (ROOT / "tests" / "classifier_mini.yaml").read_text()
    head = text[: text.index("teacher:")].replace("source: digits", "source: reviews\n  rows: 300")
    text = head + (
        "teacher:\n  model: {kind: transformer, hidden: 64, layers: 1, heads: 2, intermediate: 128,\n"
        "          training: {max_steps: -5}}\n"
        "student:\n  model: {kind: transformer, hidden: 8, layers: 1, heads: 2, intermediate: 8}\n"
        "distill: {temperature: 2.0, alpha: 0.5}\nseeds: [0]\n"
    )
    with pytest.raises(
        RecipeError,
        match=rf"c.yaml:{line_of(text, 'max_steps: -5')}: teacher.model.training.max_steps: "
        r"-5: must be a positive number of steps",
    ):
        parse_classifier_recipe(text, "c.yaml")


def test_a_key_set_twice_is_refused_with_both_lines(tmp_path):
    text = DEMO.replace("    max_steps: 600\n", "    max_steps: 600\n    max_steps: 61\n", 1)
    assert (
        f"demo.yaml:{line_of(text, 'max_steps: 61')}: teacher.training.max_steps: set twice (first at line "
        f"{line_of(text, 'max_steps: 600')}); YAML would silently keep the last value: remove one"
    ) in error_of(text)
    top = DEMO + "\nrun:\n  name: other\n"
    assert f"demo.yaml:{len(top.splitlines()) - 1}: run: set twice (first at line 5)" in error_of(top)
    assert parse_recipe(DEMO)  # the anchors and aliases of the demo's students are not repeats

    from kdflow.config.classic import parse_classifier_recipe
    from kdflow.config.self_instruct import load_self_instruct_recipe
    from kdflow.config.sweep import load_sweep

    with pytest.raises(RecipeError, match=r"c.yaml:3: seeds: set twice \(first at line 2\)"):
        parse_classifier_recipe("run: {name: c}\nseeds: [0]\nseeds: [1]\n", "c.yaml")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("recipe: recipes/demo.yaml\nstudent: seq-kd\nstudent: baseline\n")
    with pytest.raises(RecipeError, match=rf"{sweep}:3: student: set twice"):
        load_sweep(sweep)
    si = tmp_path / "si.yaml"
    si.write_text((ROOT / "recipes" / "self-instruct" / "qwen7b.yaml").read_text() + "\nfilters: {}\nfilters: {}\n")
    with pytest.raises(RecipeError, match=rf"{si}:\d+: filters: set twice"):
        load_self_instruct_recipe(si)


def test_a_byte_that_is_not_utf8_names_the_file_line_and_offset(tmp_path):
    path = tmp_path / "r.yaml"
    data = DEMO.encode().replace(b"name: seq-kd", b"name: seq-kd\xe9", 1)
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(
        RecipeError,
        match=rf"{path}:{line_of(DEMO, 'name: seq-kd')}: byte 0xe9 at offset {offset} is "
        r"not UTF-8 .*save the file as UTF-8",
    ):
        load_recipe(path)

    from kdflow.config.classic import load_classifier_recipe
    from kdflow.config.sweep import load_sweep

    for loader in (load_classifier_recipe, load_sweep):
        with pytest.raises(RecipeError, match=rf"{path}:\d+: byte 0xe9"):
            loader(path)


def test_importing_a_recipe_imports_neither_torch_nor_pyarrow():
    # The enums the sections use (Divergence, ValueEncoding) live in kdflow/config, not beside the losses and the
    # cache format: a flow, a CLI or a test that only reads a recipe does not pay for torch.
    probe = "import sys, kdflow.config.recipe; print(sorted({'torch', 'pyarrow'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_names_and_sizes_beyond_any_real_run_are_refused_at_load():
    """Issue 23, finding 9: a 300-character name and 1e9-row splits passed the recipe and failed stages later."""
    long = "a" * 101
    assert "at most 100 characters" in error_of(DEMO.replace("  name: demo\n", f"  name: {long}\n", 1))
    assert f"student name '{long}'" in error_of(DEMO.replace("name: seq-kd", f"name: {long}"))
    assert "at most 100 characters" in error_of(DEMO.replace("    prompts: 8000 ", f"    {long}: 8000 "))
    parse_recipe(DEMO.replace("name: seq-kd", "name: " + "a" * 100))  # 100 is fine
    assert "data.splits: split sizes must be integers from 1 to 10,000,000, got {'prompts': 1000000000}" in error_of(
        DEMO.replace("    prompts: 8000 ", "    prompts: 1000000000 ")
    )
    assert "generation.max_new_tokens: Input should be less than or equal to 1048576" in error_of(
        DEMO.replace("max_new_tokens: 96", "max_new_tokens: 1000000000", 1)
    )


def test_a_vocabulary_too_large_to_train_is_refused_at_its_line():
    # 1e9 passed the load and then made the BPE trainer ask for 70 GB and abort the whole process (audit, issue 23)
    text = DEMO.replace("  vocab_size: 64\n", "  vocab_size: 1000000000\n")
    msg = error_of(text)
    assert "teacher.vocab_size" in msg and f"demo.yaml:{line_of(text, 'vocab_size: 1000000000')}:" in msg
    assert "1048576" in msg.replace(",", "").replace("_", "")


def test_a_whole_number_in_e_notation_is_told_to_be_written_whole():
    # The fourth audit (docs/results/audit.md): `max_steps: 1e3` was told to write 1.0e+03, which is refused in turn.
    msg = error_of(DEMO.replace("      max_steps: 1500", "      max_steps: 1e3"))
    assert (
        "students.0.training.max_steps: '1e3' is not a int (YAML reads 1e3 as text: write it as a whole number, " in msg
    )
    assert "1000)" in msg and "with a dot" not in msg
