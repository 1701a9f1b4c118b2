"""The classic KD stages' work, without Prefect: the classifier data written as tensors, one classifier of the
recipe's kind fitted (an MLP on the digits, a transformer on the generated reviews) with its logits on every split
(``logits.safetensors``), and the metrics read back from them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdflow.classic import digits as classifier_kd
from kdflow.classic import hf as classifier_hf
from kdflow.classic.digits import SPLITS, Split
from kdflow.config.classic import MLP, ClassifierData, DataSection, Transformer
from kdflow.store.outputs import OutputRef

LOGITS = "logits.safetensors"


def write_splits(section: DataSection, out: Path) -> dict[str, Split]:
    """The train / val / test splits as tensors (``splits.safetensors``); for reviews also the tokenizer and the
    generated rows as text (``rows.jsonl``)."""
    if section.source is ClassifierData.digits:
        splits = classifier_kd.load_digits_splits(section.seed, section.test_fraction, section.val_fraction)
    else:
        tokenizer = classifier_hf.word_tokenizer()
        splits, rows = classifier_hf.load_review_splits(section.rows, section.seed, section.test_fraction,
                                                        section.val_fraction, tokenizer)
        tokenizer.save_pretrained(out / "tokenizer")
        with open(out / "rows.jsonl", "w") as f:
            f.writelines(json.dumps({**r, "split": name}) + "\n" for name, part in rows.items() for r in part)
    save_file({f"{name}.{part}": getattr(s, part).contiguous() for name, s in splits.items() for part in "xy"},
              out / "splits.safetensors")
    return splits


def read_splits(data: OutputRef) -> dict[str, Split]:
    tensors = load_file(Path(data.path) / "splits.safetensors")
    return {name: Split(tensors[f"{name}.x"], tensors[f"{name}.y"]) for name in SPLITS}


def read_logits(ref: OutputRef, split: str) -> torch.Tensor:
    return load_file(Path(ref.path) / LOGITS)[split]


def fit(model: MLP | Transformer, data: OutputRef, seed: int, out: Path, teacher_logits: torch.Tensor | None = None,
        alpha: float = 1.0, temperature: float = 1.0) -> int:
    """Train one classifier of the recipe's kind, save it under ``out`` with its logits on every split
    (``logits.safetensors``); returns its parameter count."""
    splits = read_splits(data)
    kd = dict(teacher_logits=teacher_logits, alpha=alpha, temperature=temperature)
    if isinstance(model, MLP):
        classes = int(splits["train"].y.max()) + 1
        net = classifier_kd.mlp(splits["train"].x.shape[1], model.hidden, classes, model.dropout, seed)
        t = model.training
        training = classifier_kd.Training(t.epochs, t.batch_size, t.learning_rate, t.weight_decay)
        classifier_kd.train(net, splits["train"], training, seed, **kd)
        save_file(net.state_dict(), out / "model.safetensors")
        logits = {name: classifier_kd.predict_logits(net, s.x) for name, s in splits.items()}
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(data.path) / "tokenizer")
        pad = tokenizer.pad_token_id
        net = classifier_hf.sequence_classifier(tokenizer, model.hidden, model.layers, model.heads,
                                                model.intermediate, seed)
        classifier_hf.train_classifier(net, splits["train"], pad, model.training, out, seed, **kd)
        net.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        logits = {name: classifier_hf.predict_logits(net, s.x, pad) for name, s in splits.items()}
    save_file({name: z.contiguous() for name, z in logits.items()}, out / LOGITS)
    return classifier_kd.count_params(net)


def metrics_of(logits: dict[str, torch.Tensor], data: OutputRef) -> dict:
    """Accuracy and error counts on val and test."""
    splits = read_splits(data)
    return {name: classifier_kd.accuracy(logits[name], splits[name].y) for name in ("val", "test")}
