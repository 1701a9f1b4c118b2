"""A tokenizer's identity: what decides its token ids and its chat template, hashed. A logit cache records it, and a
cache (or a logit dataset exported from one) is read only with the tokenizer it was made with; the recipe checks it at
load, before any work, where both tokenizers are on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# The files a saved Hugging Face tokenizer keeps its vocabulary in (a fast tokenizer's one file, a BPE's pair, a
# SentencePiece model); a model folder with none of them has no tokenizer to load.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model")


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model"))


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """Hashes of what decides token ids: the tokenizer's model, pre-/post-processing and added tokens
    (not its padding or truncation settings, which do not change ids), and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "post_processor", "added_tokens")}
    else:  # a slow tokenizer: its vocabulary is the best identity we have
        spec = sorted(tokenizer.get_vocab().items())
    return {
        "tokenizer_sha256": sha256_text(json.dumps(spec, sort_keys=True)),
        "chat_template_sha256": sha256_text(getattr(tokenizer, "chat_template", None)),
        "tokenizer_size": len(tokenizer),
    }
