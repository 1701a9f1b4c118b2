"""Classic KD through transformers: ``AutoModelForSequenceClassification`` teacher and student, trained by
a ``Trainer`` subclass whose loss is ``kdflow.training.losses.hinton_loss`` (the same function the MLP path uses).

**The data is generated, not collected.** No text-classification set ships inside an installed or
installable package here (scikit-learn's 20 newsgroups, NLTK's movie reviews and the hub's sets are all
downloads, and nothing outside PyPI is reachable), so ``generate_reviews`` writes short product reviews
deterministically from a seed, with a sentiment label that a bag of words cannot read off:

- a clause is ``<subject> <verb> [not|never] [intensifier] <adjective>``; negation flips the
  adjective's polarity ("the battery was not very good" is negative);
- ``A but B`` and ``although A , B`` take the polarity of ``B``; ``A and B`` joins two clauses of the same
  polarity; so the same words appear under both labels and order decides;
- a fraction ``noise`` of the labels is flipped at random, so that no model is perfect and the teacher's
  uncertainty has something to say.

The models are tiny BERT encoders built from a config with a word-level tokenizer over the generator's
own vocabulary (no hub, no pretrained weights). Plain Python: no Prefect imports.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import Trainer

from kdflow.classic.digits import Split
from kdflow.config.classic import training_arguments
from kdflow.store.model_folders import LOG_HISTORY
from kdflow.training.losses import hinton_loss

SUBJECTS = [
    "the food",
    "the service",
    "the staff",
    "the room",
    "the screen",
    "the battery",
    "this phone",
    "the plot",
    "the acting",
    "the price",
    "the delivery",
    "the sound",
    "the camera",
    "the hotel",
]
VERBS = ["is", "was", "seemed", "felt"]
INTENSIFIERS = ["", "", "very", "really", "quite", "extremely", "somewhat"]
POSITIVE = [
    "good",
    "great",
    "excellent",
    "lovely",
    "fantastic",
    "pleasant",
    "reliable",
    "friendly",
    "fast",
    "clean",
    "sharp",
    "superb",
]
NEGATIVE = [
    "bad",
    "awful",
    "terrible",
    "poor",
    "slow",
    "rude",
    "dirty",
    "broken",
    "boring",
    "noisy",
    "cheap",
    "disappointing",
]
CONNECTIVES = ["and", "but", "although", ","]
LABELS = ["negative", "positive"]
PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
MAX_LENGTH = 24  # the longest review: [CLS] + 2 clauses of at most 7 words + 2 connective words + "."


def _clause(rng: random.Random, positive: bool) -> str:
    negated = rng.random() < 0.4
    adjective = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    words = [
        rng.choice(SUBJECTS),
        rng.choice(VERBS),
        rng.choice(["not", "never"]) if negated else "",
        rng.choice(INTENSIFIERS),
        adjective,
    ]
    return " ".join(w for w in words if w)


def generate_reviews(rows: int, seed: int, noise: float = 0.05) -> list[dict]:
    """``rows`` reviews ``{"text", "label"}`` (label 1 = positive), from ``seed`` alone."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        positive = rng.random() < 0.5
        shape = rng.choice(["one", "and", "but", "although"])
        last = _clause(rng, positive)
        if shape == "one":
            text = last
        elif shape == "and":
            text = f"{_clause(rng, positive)} and {last}"
        elif shape == "but":
            text = f"{_clause(rng, not positive)} but {last}"
        else:
            text = f"although {_clause(rng, not positive)} , {last}"
        label = int(positive) if rng.random() >= noise else int(not positive)
        out.append({"text": text + " .", "label": label})
    return out


def vocabulary() -> list[str]:
    words = {
        w for phrase in SUBJECTS + VERBS + INTENSIFIERS + POSITIVE + NEGATIVE + CONNECTIVES for w in phrase.split()
    }
    return [PAD, UNK, CLS, *sorted(words | {"not", "never", "."})]


def word_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the generator's vocabulary; prepends ``[CLS]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{CLS} $A", special_tokens=[(CLS, vocab[CLS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, cls_token=CLS, model_max_length=MAX_LENGTH
    )


def load_review_splits(
    rows: int, seed: int, test_fraction: float, val_fraction: float, tokenizer
) -> tuple[dict[str, Split], dict[str, list[dict]]]:
    """Generated reviews split train / val / test (stratified), as token ids (N, MAX_LENGTH) and labels.

    Also returns the rows themselves per split, to keep with the data for people to read.
    """
    from sklearn.model_selection import train_test_split

    reviews = generate_reviews(rows, seed)
    labels = [r["label"] for r in reviews]
    rest, test = train_test_split(reviews, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=[r["label"] for r in rest], random_state=seed
    )
    parts = {"train": train, "val": val, "test": test}
    splits = {}
    for name, part in parts.items():
        enc = tokenizer(
            [r["text"] for r in part], padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        splits[name] = Split(enc["input_ids"], torch.tensor([r["label"] for r in part]))
    return splits, parts


def sequence_classifier(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, seed: int):
    """A freshly initialised BERT ``AutoModelForSequenceClassification`` with two labels."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "bert",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_LENGTH,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config)


class HintonTrainer(Trainer):
    """A ``Trainer`` whose loss is ``hinton_loss`` against teacher logits carried in each batch.

    Batches hold ``input_ids``, ``attention_mask``, ``labels`` and, when distilling, ``teacher_logits``
    (B, C), precomputed by the teacher for exactly these rows (an offline cache, as on the LLM path).
    ``alpha = 1`` is the hard-label baseline and needs no teacher column.
    """

    def __init__(self, *args, alpha: float, temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, teacher_logits = inputs.pop("labels"), inputs.pop("teacher_logits", None)
        outputs = model(**inputs)
        loss = hinton_loss(outputs.logits, teacher_logits, labels, self.alpha, self.temperature)
        return (loss, outputs) if return_outputs else loss


def train_classifier(
    model,
    data: Split,
    pad_id: int,
    training: dict,
    out_dir: Path,
    seed: int,
    *,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
) -> list[dict]:
    """Train ``model`` in place with ``HintonTrainer``; returns (and writes) the trainer's log history.

    ``data.x``: token ids (N, L); ``teacher_logits``: (N, C) row-aligned with ``data``, or None when
    ``alpha = 1``.
    """
    from datasets import Dataset, disable_progress_bars
    from transformers import default_data_collator

    from kdflow.training.progress import report_progress

    disable_progress_bars()
    columns = {"input_ids": data.x, "attention_mask": (data.x != pad_id).long(), "labels": data.y}
    if teacher_logits is not None:
        columns["teacher_logits"] = teacher_logits.float()
    dataset = Dataset.from_dict({k: v.tolist() for k, v in columns.items()}).with_format("torch")
    args = training_arguments(training, str(out_dir / "checkpoints"), seed)
    trainer = HintonTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        alpha=alpha,
        temperature=temperature,
    )
    who = f"classifier seed {seed}" + (f", KD alpha {alpha}" if teacher_logits is not None else "")
    report_progress(trainer, "classic", who)  # progress lines naming it, not the trainer's bare {'loss': ...} dicts
    trainer.train()
    history = trainer.state.log_history
    (out_dir / LOG_HISTORY).write_text(json.dumps(history, indent=1))
    return history


@torch.no_grad()
def predict_logits(model, x: torch.Tensor, pad_id: int, batch_size: int = 512) -> torch.Tensor:
    """Token ids (N, L) -> logits (N, C), in eval mode."""
    model.eval()
    out = [model(input_ids=b, attention_mask=(b != pad_id).long()).logits for b in x.split(batch_size)]
    return torch.cat(out).float()
