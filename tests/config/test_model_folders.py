"""Damaged model folders named by a recipe (issue 23; the fourth audit found each accepted at load, to fail only in the
first stage that read the weights): refused when the recipe loads, naming the folder, what is missing and the fix."""

import json
import re
from pathlib import Path

import pytest

from kdflow.config.loading import RecipeError
from kdflow.config.recipe import load_recipe
from kdflow.models.model_folder import folder_problem, token_id_count
from tests.conftest import MINI_RECIPE, fake_weights

TOKENIZER = {
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2}},
    "added_tokens": [{"id": 47, "content": "<x>"}],
}


def folder(tmp_path: Path, *, config=None, weights=True, tokenizer=TOKENIZER) -> Path:
    """A model folder as save_pretrained leaves one, with what the test leaves out: a 48-token tokenizer (ids 0-2 and
    an added token 47) and a config of 48 rows."""
    out = tmp_path / "teacher"
    out.mkdir()
    if config is not False:
        (out / "config.json").write_text(json.dumps(config or {"model_type": "llama", "vocab_size": 48}))
    if weights:
        (out / "model.safetensors").write_bytes(fake_weights())
    if tokenizer is not None:
        (out / "tokenizer.json").write_text(tokenizer if isinstance(tokenizer, str) else json.dumps(tokenizer))
    return out


def with_teacher(tmp_path: Path, model: Path) -> Path:
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    start, end = text.index("teacher:\n"), text.index("generation:")
    text = text[:start] + f"teacher:\n  model: {model}\n\n" + text[end:]
    (tmp_path / "mini.yaml").write_text(text)
    return tmp_path / "mini.yaml"


def test_a_whole_folder_passes_and_its_token_ids_are_counted_with_the_added_ones(tmp_path):
    teacher = folder(tmp_path)
    assert folder_problem(teacher) is None
    assert token_id_count(teacher) == 48


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"config": False}, r"teacher has no config.json: it is not a saved model; save the model again"),
        ({"config": {"vocab_size": 48}}, r"config.json has no model_type: it is not a transformers model config"),
        ({"weights": False}, r"teacher has no weights \(model.safetensors, .*\); save the model again"),
        ({"tokenizer": None}, r"teacher has no tokenizer files \(tokenizer.json, .*tokenizer.save_pretrained"),
        ({"tokenizer": json.dumps(TOKENIZER)[:20]}, r"tokenizer.json is not valid JSON .*the model folder is damaged"),
        (
            {"config": {"model_type": "llama", "vocab_size": 10}},
            r"the tokenizer makes token ids up to 47, but config.json's vocab_size is 10.*not this model's",
        ),
    ],
)
def test_a_damaged_teacher_folder_is_refused_at_load_with_the_fix(tmp_path, damage, message):
    with pytest.raises(RecipeError, match=r"mini.yaml:\d+: teacher: .*" + message):
        load_recipe(with_teacher(tmp_path, folder(tmp_path, **damage)))


def test_a_weights_file_given_for_the_folder_is_refused(tmp_path):
    teacher = folder(tmp_path)
    with pytest.raises(RecipeError, match=r"model.safetensors is a file, not a model folder: point it at the folder"):
        load_recipe(with_teacher(tmp_path, teacher / "model.safetensors"))


def test_a_student_fine_tuned_from_a_damaged_folder_is_refused_at_load(tmp_path):
    student = folder(tmp_path, weights=False)
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    added = f"  - name: fine-tuned\n    model: {student}\n    data: teacher\n    training: {{max_steps: 1}}\n"
    text = text.replace("\nevaluation:", added + "\nevaluation:", 1)
    (tmp_path / "mini.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"students.\d+: .*model '.*teacher': .*teacher has no weights"):
        load_recipe(tmp_path / "mini.yaml")


@pytest.mark.parametrize(
    "weights, message",
    [
        (b"", r"model.safetensors: not a safetensors file \(its header does not parse"),
        (b"\0" * 4096, r"model.safetensors: not a safetensors file"),
        (fake_weights(b"x" * 64)[:-10], r"model.safetensors: cut short \(\d+ bytes of the \d+ its header describes\)"),
    ],
    ids=["empty", "zeroed", "truncated"],
)
def test_a_weights_file_that_is_not_whole_safetensors_is_refused_at_load(tmp_path, weights, message):
    # The fifth audit: each loaded, to fail in the first stage that read it with a SafetensorError naming no file.
    teacher = folder(tmp_path)
    (teacher / "model.safetensors").write_bytes(weights)
    with pytest.raises(RecipeError, match=r"mini.yaml:\d+: teacher: .*" + message):
        load_recipe(with_teacher(tmp_path, teacher))


def test_a_shard_index_whose_shards_are_missing_is_refused_at_load(tmp_path):
    teacher = folder(tmp_path, weights=False)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (teacher / "model.safetensors.index.json").write_text(json.dumps(index))
    (teacher / "model-00001-of-00002.safetensors").write_bytes(fake_weights())
    with pytest.raises(
        RecipeError, match=r"model-00002-of-00002.safetensors: named by the weights. index but not there"
    ):
        load_recipe(with_teacher(tmp_path, teacher))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tests.conftest import build_tiny_teacher

    return build_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher")


def damaged(tmp_path: Path, tiny: Path, change) -> Path:
    """A copy of the tiny teacher whose weights ``change`` edits (a dict of name -> tensor, returned)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = shutil.copytree(tiny, tmp_path / "damaged")
    tensors = change(load_file(out / "model.safetensors"))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def as_pickle(out: Path, tiny: Path, tensors: dict, legacy: bool = False) -> Path:
    """The tiny teacher's folder with ``tensors`` as ``pytorch_model.bin`` (torch's legacy format with ``legacy``)."""
    import torch

    out.mkdir()
    for f in tiny.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    torch.save(tensors, out / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return out


def test_whole_weights_pass_the_teacher_stage_check(tiny):
    from kdflow.models.model_folder import weights_problem

    assert weights_problem(tiny) is None


def test_a_nan_weight_fails_the_teacher_stage_naming_the_weight(tmp_path, tiny):
    # The fifth audit: a teacher with one NaN weight ran to the end: 80 empty answers, accuracy 0, perplexity nan.
    from kdflow.config.teacher import TeacherSection
    from kdflow.models.model_folder import DamagedModel
    from tasks.teacher import use_existing_teacher

    def nan(t):
        t["model.embed_tokens.weight"][0, 0] = float("nan")
        return t

    teacher = damaged(tmp_path, tiny, nan)
    with pytest.raises(DamagedModel, match=r"weight 'model.embed_tokens.weight' holds NaN or infinite values"):
        use_existing_teacher.fn(tmp_path / "run", TeacherSection(model=str(teacher)))
    assert not (tmp_path / "run" / "teacher").exists() or not any(
        (tmp_path / "run" / "teacher").glob("*/manifest.json")
    )


def test_weights_under_other_names_or_shapes_fail_the_teacher_stage(tmp_path, tiny):
    # The fifth audit: weights named transformer.* were loaded as random values (a transformers warning only), and
    # the run failed far later with "the filter kept no teacher answers".
    from kdflow.models.model_folder import weights_problem

    renamed = damaged(tmp_path, tiny, lambda t: {k.replace("model.", "transformer.", 1): v for k, v in t.items()})
    assert re.search(
        r"weights its config.json \(llama\) expects are not in the weight files, e.g. 'model\.",
        weights_problem(renamed),
    )
    import shutil

    wide = shutil.copytree(tiny, tmp_path / "wide")  # a config of twice the MLP width beside the same weights
    config = json.loads((tiny / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    assert re.search(r"weight '.*mlp.*' has shape \[.*\], and config.json makes it \[.*\]", weights_problem(wide))


@pytest.mark.parametrize("model", ["/nonexistent/student", "./nope/student"])
def test_a_student_model_that_is_not_there_and_no_hub_id_is_refused_at_load(tmp_path, model):
    # The fifth audit: loaded as a hub id, to fail in the students stage with "Repo id must be in the form ...".
    text = MINI_RECIPE.read_text().replace("root: runs", f"root: {tmp_path / 'runs'}")
    added = f"  - name: fine-tuned\n    model: {model}\n    data: gold\n    training: {{max_steps: 1}}\n"
    (tmp_path / "mini.yaml").write_text(text.replace("\nevaluation:", added + "\nevaluation:", 1))
    with pytest.raises(RecipeError, match=r"students.2: .*no such folder, and not a hub id"):
        load_recipe(tmp_path / "mini.yaml")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    (tmp_path / "mini.yaml").write_text(
        text.replace("\nevaluation:", added.replace(model, str(loop)) + "\nevaluation:")
    )
    with pytest.raises(RecipeError, match=r"no such folder, and not a hub id"):
        load_recipe(tmp_path / "mini.yaml")


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
def test_saved_models_of_other_architectures_pass_the_weights_check(tmp_path, model_type, tied):
    """No false refusal: what save_pretrained writes (tied or untied output layer, bfloat16 shards with an index)
    passes, whatever the architecture's names and buffers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdflow.models.model_folder import safetensors_problem, weights_problem

    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    else:
        sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        config = AutoConfig.for_model(model_type, **sizes, num_key_value_heads=2, vocab_size=100, head_dim=8)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()  # sharded, as large models are
    assert safetensors_problem(tmp_path / "model") is None and weights_problem(tmp_path / "model") is None


def header_file(path: Path, tensors: dict, data: bytes = b"\0" * 16) -> None:
    """A safetensors file with exactly the header ``tensors`` (whatever it says) and ``data`` after it."""
    header = json.dumps(tensors).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, r"data_offsets \[-8, 0\] do not hold"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            r"tensors 'a' and 'b' overlap",
        ),
        ({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, r"tensor 'w': no dtype the format has"),
        ({"w": [1, 2]}, r"tensor 'w': no dtype the format has"),
        ({"w": {"dtype": "F32", "shape": [2]}}, r"data_offsets None is not \[start, end\]"),
    ],
    ids=["negative", "overlap", "dtype", "list", "no-offsets"],
)
def test_a_damaged_safetensors_header_is_refused_at_load_naming_the_file(tmp_path, tensors, message):
    # The sixth audit: each loaded, to fail at the teacher stage as a bare SafetensorError (or crash the recipe load
    # with a KeyError) naming no file.
    teacher = folder(tmp_path)
    header_file(teacher / "model.safetensors", tensors)
    with pytest.raises(RecipeError, match=r"model.safetensors: a damaged safetensors header \(.*" + message):
        load_recipe(with_teacher(tmp_path, teacher))


def test_a_nan_weight_in_a_single_file_beside_clean_shards_is_found(tmp_path, tiny):
    # The sixth audit: shards saved into a folder holding a damaged model.safetensors leave that file, which a loader
    # may read first; only the shards were checked.
    from transformers import AutoModelForCausalLM

    from kdflow.models.model_folder import weights_problem

    def nan(t):
        t["model.norm.weight"][0] = float("nan")
        return t

    teacher = damaged(tmp_path, tiny, nan)
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(teacher, max_shard_size="50KB")
    assert (teacher / "model.safetensors.index.json").is_file() and (teacher / "model.safetensors").is_file()
    assert re.search(r"model.safetensors: weight 'model.norm.weight' holds NaN", weights_problem(teacher))


def test_an_integer_weight_and_a_nan_in_a_pytorch_pickle_are_found(tmp_path, tiny):
    import torch
    from safetensors.torch import load_file

    from kdflow.models.model_folder import weights_problem

    quantized = damaged(tmp_path, tiny, lambda t: {**t, "model.norm.weight": t["model.norm.weight"].to(torch.int8)})
    assert re.search(
        r"weight 'model.norm.weight' is stored as int8, and the model's is a float", weights_problem(quantized)
    )
    tensors = load_file(tiny / "model.safetensors")
    tensors["model.norm.weight"][1] = float("inf")
    pickled = as_pickle(tmp_path / "pickled", tiny, tensors)
    assert re.search(r"pytorch_model.bin: weight 'model.norm.weight' holds NaN or infinite", weights_problem(pickled))


def test_a_base_models_save_passes_as_the_loader_takes_it(tmp_path):
    # The sixth audit: GPT2Model's save (the hub layout of gpt2: no "transformer." prefix) was refused as missing every
    # weight, though from_pretrained loads it into GPT2LMHeadModel with the same logits.
    from transformers import AutoConfig, GPT2Model

    from kdflow.models.model_folder import weights_problem

    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    GPT2Model(config).save_pretrained(tmp_path / "gpt2")
    assert weights_problem(tmp_path / "gpt2") is None


@pytest.mark.parametrize("model", ["gpt2", "distilgpt2"])
def test_a_legacy_hub_id_without_namespace_is_told_its_namespaced_form(tmp_path, model):
    # The sixth audit: refused as "not a hub id (namespace/name)", though the hub resolves it; the message now says how
    # to write it (it cannot be told from a missing folder of that name).
    with pytest.raises(RecipeError, match=r"teacher: .*not a hub id .*e\.g\. openai-community/gpt2 for gpt2"):
        load_recipe(with_teacher(tmp_path, model))


def test_architectures_transformers_renames_on_load_pass_and_low_precision_weights_are_named(tmp_path, tiny):
    # The seventh audit: GPT-NeoX (embed_out, renamed lm_head on load) and mixtures of experts (fused on load) were
    # refused though from_pretrained loads them exactly; a float8 weight without a quantization config passed (or was
    # "unreadable"); a legacy-format pickle could not be memory-mapped.
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdflow.models.model_folder import weights_problem

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    for model_type, extra in (("gpt_neox", {}), ("mixtral", {"num_key_value_heads": 2, "num_local_experts": 4})):
        config = AutoConfig.for_model(model_type, **sizes, vocab_size=100, **extra)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
        assert weights_problem(tmp_path / model_type) is None, model_type

    fp8 = damaged(tmp_path, tiny, lambda t: {**t, "model.norm.weight": t["model.norm.weight"].to(torch.float8_e4m3fn)})
    assert re.search(
        r"'model.norm.weight' is stored as float8_e4m3fn, .*without their quantization", weights_problem(fp8)
    )

    legacy = as_pickle(tmp_path / "legacy", tiny, load_file(tiny / "model.safetensors"), legacy=True)
    assert weights_problem(legacy) is None
