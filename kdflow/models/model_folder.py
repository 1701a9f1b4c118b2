"""What a Hugging Face model folder must hold before kdflow spends anything on it: a readable ``config.json``, weights,
tokenizer files that parse, and an embedding with a row for every token id the tokenizer makes. Checked when the
recipe loads: a damaged folder used to load and fail only in the first stage that read its weights (the fourth audit,
docs/results/audit.md), after the stages before it had run."""

from __future__ import annotations

import json
from pathlib import Path

from kdflow.models.tokenizer_identity import TOKENIZER_FILES, has_tokenizer

# The names transformers loads weights from: one file or an index of shards, safetensors or PyTorch pickles.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
RESAVE = "save the model again into it (model.save_pretrained(folder), tokenizer.save_pretrained(folder))"


def folder_problem(folder: Path) -> str | None:
    """What is wrong with ``folder`` as a model folder, with the fix; None when it holds all a backend loads."""
    folder = Path(folder)
    if not folder.is_dir():
        return (
            f"{folder} is a file, not a model folder: point it at the folder holding config.json and the weights "
            "(or at a .gguf file)"
        )
    config = _json(folder / "config.json")
    if config is None:
        return f"{folder} has no config.json: it is not a saved model; {RESAVE}"
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        return f"{folder / 'config.json'} has no model_type: it is not a transformers model config; {RESAVE}"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return f"{folder} has no weights ({', '.join(WEIGHT_FILES)}); {RESAVE}"
    if not has_tokenizer(folder):
        return (
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the teacher's tokenizer into it "
            "(tokenizer.save_pretrained(folder)), since every backend reads the teacher's token ids and chat "
            "template from there"
        )
    ids = token_id_count(folder)
    rows = config.get("vocab_size")
    if ids is not None and isinstance(rows, int) and ids > rows:
        return (
            f"{folder}: the tokenizer makes token ids up to {ids - 1}, but config.json's vocab_size is {rows}, so the "
            "model has no embedding row for the rest: the tokenizer is not this model's; save the model's own "
            "tokenizer into the folder"
        )
    return None


def token_id_count(folder: Path) -> int | None:
    """One more than the largest token id the folder's ``tokenizer.json`` (or ``vocab.json``) can produce; None when
    neither file is there. A file that does not parse is a ValueError naming it."""
    for name in ("tokenizer.json", "vocab.json"):
        found = _json(Path(folder) / name)
        if found is None:
            continue
        if name == "vocab.json":
            return _largest(found.values() if isinstance(found, dict) else []) + 1
        model = found.get("model") if isinstance(found, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
            largest = _largest(vocab.values())
        elif isinstance(vocab, list):  # Unigram: [piece, score] by id
            largest = len(vocab) - 1
        else:
            largest = -1
        added = [t.get("id") for t in found.get("added_tokens") or [] if isinstance(t, dict)]
        return max(largest, _largest(added)) + 1
    return None


def _largest(ids) -> int:
    return max((i for i in ids if isinstance(i, int)), default=-1)


def _json(path: Path):
    """The parsed file; None when it does not exist; a ValueError naming it when it does not parse."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}): the model folder is damaged; copy or save it again"
        ) from None
