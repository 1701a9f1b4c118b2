"""What a Hugging Face model folder must hold before kdflow spends anything on it: a readable ``config.json``, weights,
tokenizer files that parse, and an embedding with a row for every token id the tokenizer makes. Checked when the
recipe loads: a damaged folder used to load and fail only in the first stage that read its weights (the fourth audit,
docs/results/audit.md), after the stages before it had run."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kdflow.models.tokenizer_identity import TOKENIZER_FILES, has_tokenizer

# The names transformers loads weights from: one file or an index of shards, safetensors or PyTorch pickles.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A Hugging Face hub repo id as a recipe names one: namespace/name, each of letters, digits, '-', '_' and '.', neither
# starting with '.' or '-'. An absolute path or one starting with ./ or ../ is none, so a missing folder written so is
# refused at load rather than by the first stage that loads it ("Repo id must be in the form ...").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
RESAVE = "save the model again into it (model.save_pretrained(folder), tokenizer.save_pretrained(folder))"


def maybe_hub_id(model: str) -> bool:
    return HUB_ID.fullmatch(model) is not None


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
    if problem := safetensors_problem(folder):
        return problem
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


class DamagedModel(ValueError):
    """A model folder whose weights a loader would silently get wrong (``weights_problem``)."""


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the folder's weights are in: ``model.safetensors``, or the shards its index names."""
    folder = Path(folder)
    index = _json(folder / "model.safetensors.index.json")
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        return [folder / name for name in dict.fromkeys(index["weight_map"].values())]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def safetensors_problem(folder: Path) -> str | None:
    """A safetensors file the folder's weights need that is missing, cut short or not safetensors (a zeroed or empty
    file), read from its header alone; None when each is whole. What a loader would say instead names no file."""
    for file in weight_files(folder):
        if not file.is_file():
            return f"{file}: named by model.safetensors.index.json but not there; copy the missing shard or {RESAVE}"
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = f.read(length) if 0 < length <= size - 8 else b""
        try:
            tensors = json.loads(header) if header else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            tensors = None
        if not isinstance(tensors, dict):
            return f"{file}: not a safetensors file (its header does not parse: empty, zeroed or damaged); {RESAVE}"
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
        if 8 + length + end > size:
            return f"{file}: cut short ({size:,} bytes of the {8 + length + end:,} its header describes); {RESAVE}"
    return None


def weights_problem(folder: Path) -> str | None:
    """What a loader would silently get wrong in the folder's weights, found by reading them one tensor at a time: a
    weight the model's config expects that the files lack (other names, e.g. ``transformer.*`` for ``model.*``: it
    would be left at its random initialisation), one of another shape, or a value that is NaN or infinite (every
    answer would be garbage). None when the weights are the model's. Needs torch and transformers, and reads every
    byte: a stage runs it once per folder content, not the recipe load."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        return None  # PyTorch pickles (pytorch_model.bin): transformers' own loader is all there is
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # the names and shapes its config makes, with no memory for the values
        model = AutoModelForCausalLM.from_config(config)
    # Parameters, not the state dict: a tied output layer is the embedding's parameter, listed once, and buffers
    # (rotary frequencies and the like) are computed, not loaded.
    expected = {k: tuple(v.shape) for k, v in model.named_parameters()}
    shapes, nonfinite = {}, None
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                shapes[name] = tuple(tensor.shape)
                if nonfinite is None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    nonfinite = (file, name)
    if getattr(config, "tie_word_embeddings", False):  # the output layer is the input embedding, stored once
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
    missing = [
        k for k in expected if k not in shapes and f"model.{k}" not in shapes and k.removeprefix("model.") not in shapes
    ]
    if missing:
        return (
            f"{folder}: {len(missing)} of the {len(expected)} weights its config.json ({config.model_type}) expects "
            f"are not in the weight files, e.g. {missing[0]!r} (the files hold names like "
            f"{next(iter(shapes), None)!r}); a loader would leave them at random values: {RESAVE}"
        )
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if wrong:
        k = wrong[0]
        return (
            f"{folder}: weight {k!r} has shape {list(shapes[k])}, and config.json makes it {list(expected[k])}: the "
            f"config is not these weights'; {RESAVE}"
        )
    if nonfinite is not None:
        return (
            f"{nonfinite[0]}: weight {nonfinite[1]!r} holds NaN or infinite values: every logit it touches would be "
            "NaN; use an undamaged copy of the model"
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
