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
from kdflow.classic.omitted import class_accuracy, drop_class
from kdflow.classic.omitted import evaluate as evaluate_omitted
from kdflow.config.classic import MLP, ClassifierData, ClassifierDataSection, Transformer
from kdflow.store.outputs import OutputRef

LOGITS = "logits.safetensors"  # a classifier's logits on every split
SPLITS_FILE = "splits.safetensors"  # the classifier-data stage's splits as tensors


def write_splits(section: ClassifierDataSection, out: Path) -> dict[str, Split]:
    """The train / val / test splits as tensors (``splits.safetensors``); for reviews also the tokenizer and the
    generated rows as text (``rows.jsonl``)."""
    if section.source is ClassifierData.digits:
        splits = classifier_kd.load_digits_splits(section.seed, section.test_fraction, section.val_fraction)
    else:
        tokenizer = classifier_hf.word_tokenizer()
        splits, rows = classifier_hf.load_review_splits(
            section.rows, section.seed, section.test_fraction, section.val_fraction, tokenizer
        )
        tokenizer.save_pretrained(out / "tokenizer")
        with open(out / "rows.jsonl", "w") as f:
            f.writelines(json.dumps({**r, "split": name}) + "\n" for name, part in rows.items() for r in part)
    save_file(
        {f"{name}.{part}": getattr(s, part).contiguous() for name, s in splits.items() for part in "xy"},
        out / SPLITS_FILE,
    )
    return splits


def read_splits(data: OutputRef) -> dict[str, Split]:
    tensors = load_file(Path(data.path) / SPLITS_FILE)
    return {name: Split(tensors[f"{name}.x"], tensors[f"{name}.y"]) for name in SPLITS}


def read_logits(ref: OutputRef, split: str) -> torch.Tensor:
    return load_file(Path(ref.path) / LOGITS)[split]


def fit(
    model: MLP | Transformer,
    data: OutputRef,
    seed: int,
    out: Path,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    omit_class: int | None = None,
) -> int:
    """Train one classifier of the recipe's kind, save it under ``out`` with its logits on every split
    (``logits.safetensors``); returns its parameter count. ``omit_class``: train on the training split without
    that class (Hinton's omitted class; MLPs only); the logits still cover every row of every split."""
    splits = read_splits(data)
    train = splits["train"]
    if omit_class is not None:
        if not isinstance(model, MLP):
            raise ValueError("omit_class is for the digits MLPs only")
        train, teacher_logits = drop_class(train, omit_class, teacher_logits)
    kd = dict(teacher_logits=teacher_logits, alpha=alpha, temperature=temperature)
    if isinstance(model, MLP):
        classes = int(splits["train"].y.max()) + 1  # the full split's: a class left out still gets its output
        net = classifier_kd.mlp(train.x.shape[1], model.hidden, classes, model.dropout, seed)
        t = model.training
        training = classifier_kd.Training(t.epochs, t.batch_size, t.learning_rate, t.weight_decay)
        classifier_kd.train(net, train, training, seed, **kd)
        save_file(net.state_dict(), out / "model.safetensors")
        logits = {name: classifier_kd.predict_logits(net, s.x) for name, s in splits.items()}
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(data.path) / "tokenizer")
        pad = tokenizer.pad_token_id
        net = classifier_hf.sequence_classifier(
            tokenizer, model.hidden, model.layers, model.heads, model.intermediate, seed
        )
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


def transfer_rows(data: OutputRef, omit_class: int | None = None) -> int:
    """How many training rows a student learns from: all of them, or those not of ``omit_class``."""
    y = read_splits(data)["train"].y
    return len(y) if omit_class is None else int((y != omit_class).sum())


def score_omitted(ref: OutputRef, data: OutputRef, label: int) -> dict:
    """A student's figures on the class left out of its transfer set (``omitted.evaluate``), from its saved
    logits: the bias raise is chosen on val and scored on test."""
    logits = load_file(Path(ref.path) / LOGITS)
    return evaluate_omitted(logits, read_splits(data), label)


def class_accuracy_of(logits: torch.Tensor, data: OutputRef, split: str, label: int) -> dict:
    return class_accuracy(logits, read_splits(data)[split].y, label)
