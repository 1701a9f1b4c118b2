"""Models and BPE tokenizers built locally (no model hub is reachable): tiny Llamas for the demo, and
Qwen2-architecture models at Qwen2.5's real shapes and 151,936-row vocabulary for work at scale.

The demo uses Llama: a saved ``qwen2`` folder reloads its tokenizer as ``Qwen2Tokenizer``, which re-splits
text its own way and changes token ids; ``large_vocab_tokenizer`` trains with Qwen2's own pre-tokenizer so a
Qwen2 folder reloads with the same ids (``save_qwen2`` checks it). Digits are single tokens in both, so
arithmetic is learnable by a 100K-parameter model.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

BOS, EOS, PAD, UNK = "<|bos|>", "<|end|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# The assistant turn sits in a {% generation %} block so TRL's assistant-only loss can find it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with every digit its own token, plus chat special tokens and template.

    The alphabet is the characters of ``texts`` only (not all 256 bytes): a 60-token vocabulary keeps the
    embedding from dominating a 100K-parameter student. Anything unseen maps to ``<|unk|>``.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK, *ROLE_TOKENS],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return with_chat_template(tok)


def with_chat_template(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    seed: int,
    max_positions: int = 256,
) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by the recipe; head dimension is hidden / heads."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_params(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# Qwen2.5's vocabulary: 151,665 tokens (151,643 BPE + 22 special) in an embedding of 151,936 rows — the
# rows past the tokenizer are padding (to a multiple of 128) that no id reaches.
QWEN25_TOKENS = 151_665
QWEN25_VOCAB_ROWS = 151_936


@dataclass(frozen=True)
class Qwen2Shape:
    """The shapes of a Qwen2-architecture causal LM; head dimension = hidden / heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_rows: int = QWEN25_VOCAB_ROWS
    rope_theta: float = 1_000_000.0
    max_positions: int = 32_768
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shrunk(self, **changes) -> "Qwen2Shape":
        """This shape with some fields changed (fewer layers, a narrower width) for tests and CPU runs."""
        return replace(self, **changes)


# Qwen2.5-0.5B (its config.json): 494M parameters, head dimension 64, grouped-query attention 14 : 2.
QWEN25_05B = Qwen2Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864)


def qwen2_config(shape: Qwen2Shape, tokenizer: PreTrainedTokenizerFast | None = None) -> Qwen2Config:
    """A ``Qwen2Config`` for ``shape``; special-token ids from ``tokenizer`` when given."""
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ValueError(f"Qwen2 shape {shape}: hidden must divide by heads and heads by kv_heads")
    if tokenizer is not None and len(tokenizer) > shape.vocab_rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the shape only {shape.vocab_rows} "
            "embedding rows: raise vocab_rows to at least the tokenizer's length"
        )
    ids = (
        {}
        if tokenizer is None
        else dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return Qwen2Config(
        vocab_size=shape.vocab_rows,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=shape.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        use_sliding_window=False,
        **ids,
    )


def qwen2_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    shape: Qwen2Shape = QWEN25_05B,
    seed: int = 0,
    dtype=None,
    **changes,
) -> Qwen2ForCausalLM:
    """A freshly initialised (seeded, random) Qwen2-architecture causal LM of ``shape`` — by default
    Qwen2.5-0.5B's — with ``changes`` to shrink it, e.g. ``qwen2_model(tok, layers=2, hidden=128, heads=2,
    kv_heads=1, intermediate=256)``. The embedding keeps ``shape.vocab_rows`` rows whatever the tokenizer's
    length, as Qwen2.5's does. ``dtype`` (a torch dtype) casts the weights after a float32 initialisation."""
    import torch

    config = qwen2_config(shape.shrunk(**changes), tokenizer)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    return model if dtype is None else model.to(dtype)


def synthetic_words(lines: int, seed: int = 0, words_per_line: int = 20) -> Iterator[str]:
    """Lines of pronounceable made-up words (1–4 syllables), seeded: enough distinct words for a BPE to learn
    150k merges, which GSM8K's English alone cannot give (it yields ~24.8k tokens)."""
    rng = random.Random(seed)
    onsets = [
        "",
        "b",
        "c",
        "d",
        "f",
        "g",
        "h",
        "j",
        "k",
        "l",
        "m",
        "n",
        "p",
        "r",
        "s",
        "t",
        "v",
        "w",
        "z",
        "ch",
        "sh",
        "th",
        "st",
        "tr",
        "br",
        "pl",
        "gr",
        "kl",
    ]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "io", "y"]
    codas = ["", "n", "r", "s", "l", "m", "t", "x", "nd", "rk", "st"]
    word = lambda: "".join(
        rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 4))
    )
    for _ in range(lines):
        yield " ".join(word() for _ in range(words_per_line))


# Qwen2's own pre-tokenizer (transformers' tokenization_qwen2.py): digits one by one, a punctuation mark may
# lead a word. A qwen2 folder always reloads as Qwen2Tokenizer, which rebuilds its pipeline from this regex
# and ignores the one in tokenizer.json — so a BPE trained with the same pipeline keeps its ids on reload.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501  (the regex as Qwen2Tokenizer has it)


def large_vocab_tokenizer(
    texts: Iterable[str], vocab_size: int = QWEN25_TOKENS, synthetic_lines: int = 25_000, seed: int = 0
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of up to ``vocab_size`` tokens (default Qwen2.5's 151,665) with Qwen2's normaliser and
    pre-tokenizer and all 256 bytes in its alphabet (no text maps to ``<|unk|>``), learnt from ``texts`` (e.g.
    GSM8K) plus ``synthetic_lines`` of made-up words. With GSM8K and the default 25,000 synthetic lines it
    reaches the full 151,665 (~17 s on 2 cores); BPE stops early when no pair is left to merge, so check
    ``len()`` when you pass less text."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*texts, *synthetic_words(synthetic_lines, seed)], trainer=trainer)
    return with_chat_template(tok)


ROUND_TRIP_PROBE = (
    "Weng earns $12/hour (50 minutes): 0.2 x 50 = $10.\n\n#### 10 — naïve café's “quotes” <|assistant|>ok<|end|>"
)


def save_qwen2(folder: Path, model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Save a Qwen2 model and its tokenizer, and check that the folder reloads with the SAME token ids.

    transformers (and so vLLM) reloads any ``qwen2`` folder's tokenizer as ``Qwen2Tokenizer`` whatever
    tokenizer_config.json names, rebuilding Qwen's own pre-tokenizer: only a tokenizer made by
    ``large_vocab_tokenizer`` (Qwen2's pipeline) keeps its ids; any other is refused here, before training."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(folder)
    if reloaded(ROUND_TRIP_PROBE).input_ids != tokenizer(ROUND_TRIP_PROBE).input_ids:
        raise ValueError(
            f"{folder}: the saved qwen2 folder reloads its tokenizer as {type(reloaded).__name__}, "
            "which splits text differently; build the tokenizer with large_vocab_tokenizer (Qwen2's "
            "pre-tokenizer) or save the model as Llama (llama_model)"
        )
    return folder
