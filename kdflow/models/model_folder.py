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


# Said of a model path that is neither here nor a hub id. A legacy hub id without a namespace (gpt2, distilgpt2) is
# refused too: it cannot be told from a missing folder, and the hub answers its namespaced form as well.
NOT_THERE = (
    "no such folder, and not a hub id (namespace/name: a legacy id without a namespace is written with it, e.g. "
    "openai-community/gpt2 for gpt2)"
)


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


# Bytes per element of each safetensors dtype (the format's own list): a header's offsets must match its shapes.
# Sub-byte dtypes (F4, F6_*) are packed: their offsets are not checked against the shape (None).
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2}
SAFETENSORS_DTYPES |= {"I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8, "F8_E8M0": 1}
SAFETENSORS_DTYPES |= {"F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F4": None, "F6_E2M3": None, "F6_E3M2": None}


def weight_files(folder: Path) -> list[Path]:
    """Every file a loader may read the folder's weights from: ``model.safetensors`` and the shards its index names
    (a folder can hold both: save_pretrained writing shards beside an older single file leaves that file, and which
    one a loader takes is not ours to guess), else the PyTorch pickles likewise."""
    folder, files = Path(folder), []
    for single in ("model.safetensors", "pytorch_model.bin"):
        index = _json(folder / f"{single}.index.json")
        if (folder / single).is_file():
            files.append(folder / single)
        if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
            files += [folder / str(name) for name in dict.fromkeys(index["weight_map"].values())]
        if files:
            return list(dict.fromkeys(files))
    return files


def safetensors_problem(folder: Path) -> str | None:
    """A weight file the folder needs that is missing, or a safetensors file cut short or whose header is not a whole
    safetensors header (a zeroed or empty file; offsets that are negative, overlap or do not match their shapes; a
    dtype the format lacks), read from the headers alone; None when each is whole. What a loader would say instead
    names no file."""
    for file in weight_files(folder):
        if not file.is_file():
            return f"{file}: named by the weights' index but not there; copy the missing shard or {RESAVE}"
        if file.suffix != ".safetensors":
            continue
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
        if problem := _header_problem({k: v for k, v in tensors.items() if k != "__metadata__"}):
            return f"{file}: a damaged safetensors header ({problem}); {RESAVE}"
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
        if 8 + length + end > size:
            return f"{file}: cut short ({size:,} bytes of the {8 + length + end:,} its header describes); {RESAVE}"
    return None


def _header_problem(tensors: dict) -> str | None:
    """What is wrong with a parsed safetensors header's tensor entries, or None."""
    spans = []
    for name, t in tensors.items():
        if not isinstance(t, dict) or t.get("dtype") not in SAFETENSORS_DTYPES:
            return f"tensor {name!r}: no dtype the format has"
        shape, offsets = t.get("shape"), t.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            return f"tensor {name!r}: shape {shape!r} is not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
            return f"tensor {name!r}: data_offsets {offsets!r} is not [start, end]"
        count = 1
        for n in shape:
            count *= n
        width = SAFETENSORS_DTYPES[t["dtype"]]
        if not 0 <= offsets[0] <= offsets[1] or (width is not None and offsets[1] - offsets[0] != count * width):
            return f"tensor {name!r}: data_offsets {offsets} do not hold its {t['dtype']} shape {shape}"
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, before), (begin, _, after) in zip(spans, spans[1:]):
        if begin < end:
            return f"tensors {before!r} and {after!r} overlap"
    return None


def weights_problem(folder: Path) -> str | None:
    """What a loader would silently get wrong in the folder's weights, found by reading them one tensor at a time: a
    weight the model's config expects that the files lack (other names, e.g. ``transformer.*`` for ``model.*``: it
    would be left at its random initialisation), one of another shape, an integer tensor where the model has a float
    weight (quantized values without their quantization config), or a value that is NaN or infinite (every answer
    would be garbage). None when the weights are the model's. Needs torch and transformers, and reads every byte: a
    stage runs it once per folder content, not the recipe load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        return None
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # the names and shapes its config makes, with no memory for the values
        model = AutoModelForCausalLM.from_config(config)
    # Parameters, not the state dict: a tied output layer is the embedding's parameter, listed once, and buffers
    # (rotary frequencies and the like) are computed, not loaded.
    expected = {k: tuple(v.shape) for k, v in model.named_parameters()}
    if getattr(config, "tie_word_embeddings", False):  # the output layer is the input embedding, stored once
        expected = {k: v for k, v in expected.items() if not k.startswith("lm_head.")}
    base = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    quantized = getattr(config, "quantization_config", None) is not None
    stored, bad = {}, None  # expected name -> shape; the first (file, name, why) found wrong
    for file in files:
        try:
            tensors = _tensors(file)
            for name, tensor in tensors:
                # a base model's save (no "model." / "transformer." prefix) loads into the causal LM: the same weights
                key = name if name in expected or not base or f"{base}{name}" not in expected else f"{base}{name}"
                stored[key] = tuple(tensor.shape)
                if quantized:  # the config says how its low-precision tensors are read: not ours to judge
                    continue
                if bad is None and key in expected and (not tensor.is_floating_point() or tensor.element_size() < 2):
                    bad = (
                        file,
                        name,
                        f"is stored as {str(tensor.dtype).removeprefix('torch.')}, and the model's is "
                        "a float weight: quantized values without their quantization config would be cast as they are",
                    )
                elif bad is None and tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():
                    bad = (file, name, "holds NaN or infinite values: every logit it touches would be NaN")
        except Exception as e:  # noqa: BLE001 -- whatever the reader says, it says it of this file
            return f"{file}: unreadable as model weights ({type(e).__name__}: {e}); {RESAVE}"
    missing = [k for k in expected if k not in stored]
    # transformers 5 renames and fuses some checkpoints' weights as it loads them (GPT-NeoX's embed_out, the experts of
    # a mixture of experts): a few names it expects may be absent from a folder it loads exactly. Weights named for
    # another model altogether (most of them absent) are what would load at random values.
    if len(missing) > len(expected) / 2:
        return (
            f"{folder}: {len(missing)} of the {len(expected)} weights its config.json ({config.model_type}) expects "
            f"are not in the weight files, e.g. {missing[0]!r} (the files hold names like "
            f"{next(iter(stored), None)!r}); a loader would leave them at random values: {RESAVE}"
        )
    wrong = [k for k in expected if k in stored and stored[k] != expected[k]]
    if wrong:
        k = wrong[0]
        return (
            f"{folder}: weight {k!r} has shape {list(stored[k])}, and config.json makes it {list(expected[k])}: the "
            f"config is not these weights'; {RESAVE}"
        )
    if bad is not None:
        return f"{bad[0]}: weight {bad[1]!r} {bad[2]}; use an undamaged copy of the model"
    return None


def _tensors(file: Path):
    """(name, tensor) of a safetensors file one at a time, or of a PyTorch pickle (memory-mapped, weights only)."""
    import torch

    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a pickle of torch's legacy format cannot be memory-mapped: read it whole
            state = torch.load(file, map_location="cpu", weights_only=True)
        yield from state.items()


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
