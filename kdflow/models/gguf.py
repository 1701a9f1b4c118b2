"""GGUF files (llama.cpp, Ollama) as teachers and students: checked, then imported once into a plain Hugging Face
folder — safetensors in the chosen dtype, the tokenizer with the file's chat template, a generation config — which
every backend reads (HF generation, vLLM, the logit cache, training, evaluation). The weights are the file's,
dequantized: a Q4 model imported at float32 computes what llama.cpp computes, not what the unquantized original did.

    info = inspect_gguf(path)              # cheap: header and metadata; raises GgufError naming the file and the fix
    import_gguf(path, folder, "float32")   # ~20 s for SmolLM2-135M: dequantize, save, reload-check
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path

MAGIC = b"GGUF"
GGUF_FIX = "point the model field at a .gguf file written by llama.cpp (convert_hf_to_gguf.py) or pulled by Ollama"


class GgufError(ValueError):
    """A file named as a GGUF model cannot be imported; the message names the file and what to do."""


@dataclass(frozen=True)
class GgufInfo:
    architecture: str  # general.architecture, as llama.cpp names it (llama, qwen2, …)
    model_name: str | None  # general.name
    tensors: int
    quantization: str  # the most common tensor type, e.g. Q4_1
    chat_template: bool  # the file carries tokenizer.chat_template

    def summary(self) -> dict:
        return asdict(self)


def is_gguf_path(model: str | None) -> bool:
    return model is not None and model.lower().endswith(".gguf")


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def inspect_gguf(path: str | Path) -> GgufInfo:
    """What the file holds, read from its header and metadata (tensor data is memory-mapped, not read), or a
    GgufError: no such file, not a GGUF file, damaged or truncated, an architecture transformers cannot load."""
    path = Path(path)
    if not path.is_file():
        raise GgufError(f"{path}: no such file; {GGUF_FIX} (`make smollm2` fetches SmolLM2-135M-Instruct)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise GgufError(f"{path} is not a GGUF file (it starts with {head!r}, a GGUF file with {MAGIC!r}); {GGUF_FIX}")
    reader = _reader(path)
    architecture = str(reader.fields["general.architecture"].contents())
    if architecture not in supported_architectures():
        raise GgufError(
            f"{path}: architecture {architecture!r} cannot be loaded from GGUF by transformers "
            f"(it loads {', '.join(supported_architectures())}); convert the original checkpoint "
            "instead and set model to its folder"
        )
    name = reader.fields.get("general.name")
    types = [t.tensor_type.name for t in reader.tensors]
    return GgufInfo(
        architecture=architecture,
        model_name=None if name is None else str(name.contents()),
        tensors=len(types),
        quantization=max(set(types), key=types.count),
        chat_template="tokenizer.chat_template" in reader.fields,
    )


def _reader(path: Path):
    stat = path.stat()  # read once per file version: a recipe load asks twice (inspect, layer count)
    return _cached_reader(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(name: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    path = Path(name)

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        # gguf's reader reports a short file as a reshape or dtype error of whichever tensor runs past the end.
        raise GgufError(
            f"{path} is damaged or truncated ({path.stat().st_size:,} bytes; reading it failed: {e}); "
            "download or copy it again and check its sha256"
        ) from None
    if "general.architecture" not in reader.fields:
        raise GgufError(f"{path}: no general.architecture in its metadata, so no model class can be chosen; {GGUF_FIX}")
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise GgufError(
            f"{path} is truncated: its tensors end at byte {end:,}, the file has {path.stat().st_size:,}; "
            "download or copy it again"
        )
    return reader


def import_gguf(path: str | Path, folder: Path, dtype: str = "float32") -> dict:
    """Dequantize the GGUF at ``path`` into a Hugging Face folder ``folder`` (created): ``model.safetensors`` in
    ``dtype``, the tokenizer (with the file's chat template), ``generation_config.json``. Returns what the manifest
    records. The saved folder is reloaded and must give the same logits as the dequantized model (a check, since a
    name mismatch between GGUF and transformers would otherwise leave weights silently at their initial values)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, folder = Path(path), Path(folder)
    info = inspect_gguf(path)
    torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # save_pretrained refuses a model that carries the GGUF quantization config: rebuild the same class without it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise GgufError(
            f"{path}: the dequantized weights do not match {type(loaded).__name__} (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); transformers' GGUF support for {info.architecture!r} is "
            "incomplete: convert the original checkpoint instead"
        )
    model.tie_weights()
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    ).save_pretrained(folder)
    _check_reload(loaded, folder, tokenizer, torch_dtype)
    return {
        "gguf": path.name,
        **info.summary(),
        "dtype": dtype,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab_size": config.vocab_size,
        "layers": config.num_hidden_layers,
    }


def _check_reload(reference, folder: Path, tokenizer, torch_dtype) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    with torch.no_grad():
        a, b = reference(ids).logits, saved(ids).logits
    if not torch.equal(a, b):
        raise GgufError(
            f"{folder}: the saved model's logits differ from the GGUF's (max |Δ| "
            f"{(a - b).abs().max().item():.3g}); not keeping it"
        )


def layer_count(model: str) -> int | None:
    """Decoder layers of a model folder (config.json) or GGUF file (``<arch>.block_count``); None when unknown."""
    return _shape(model, "block_count", "num_hidden_layers")


def mlp_width(model: str) -> int | None:
    """MLP channels per layer of a model folder (``intermediate_size``) or GGUF file (``<arch>.feed_forward_length``);
    None when unknown."""
    return _shape(model, "feed_forward_length", "intermediate_size")


def vocab_count(model: str) -> int | None:
    """Vocabulary of a model folder (``vocab_size``) or GGUF file (``<arch>.vocab_size``, else its token list);
    None when unknown."""
    path = Path(model)
    if is_gguf_path(model) and path.is_file():
        found = _shape(model, "vocab_size", "vocab_size")
        tokens = _reader(path).fields.get("tokenizer.ggml.tokens")
        return found if found is not None or tokens is None else len(tokens.data)
    return _shape(model, "vocab_size", "vocab_size")


def _shape(model: str, gguf_key: str, config_key: str) -> int | None:
    import json

    path = Path(model)
    if is_gguf_path(model) and path.is_file():
        reader = _reader(path)
        arch = str(reader.fields["general.architecture"].contents())
        field = reader.fields.get(f"{arch}.{gguf_key}")
        return None if field is None else int(field.contents())
    config = path / "config.json"
    if config.is_file():
        try:
            found = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{config} is not valid JSON ({e}): the model folder is damaged; copy or save it again"
            ) from None
        value = found.get(config_key) if isinstance(found, dict) else None
        return value if isinstance(value, int) else None
    return None
