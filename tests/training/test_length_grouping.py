"""`train_sampling_strategy: group_by_length` (transformers' length-grouped sampler, a training key any student
section passes through) reaches each of kdflow's trainers: SFT, offline KD and on-policy KD each train on batches of
rows of about one length. benchmarks/length_grouping.py measures what it saves.

With fewer rows than one megabatch (50 batches), the sampler sorts the whole epoch by length, longest first: the
rows arrive in non-increasing length. The random sampler, the default, does not sort them."""

import pandas as pd
import pytest
import torch

from kdflow.config.logit_cache import LogitCacheSection
from kdflow.config.templates import chat
from kdflow.config.training import trainer_config
from kdflow.logit_cache.reader import LogitCache
from kdflow.store.model_folders import write_location
from kdflow.training import sft
from kdflow.training.offline_kd import CachedLogitsCollator, train_offline_kd
from kdflow.training.on_policy import OnPolicyCollator, train_on_policy
from tests.logit_cache.test_capture import TEMPLATE, kept_rows, stage_ref, tiny_teacher
from tests.training.test_kd_trainer import kd_config
from tests.training.test_kd_trainer import student as kd_student
from tests.training.test_on_policy import op_config, settings
from tests.training.test_on_policy import student as on_policy_student

torch.set_num_threads(1)
ROWS = 48
# Batches of 2: the sampler's megabatches are min(rows / (4 x batch), 50) batches, so 48 rows make 4 megabatches of 12.
ONE_EPOCH = {"num_train_epochs": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_length": 96}
STRATEGIES = ("random", "group_by_length")


def positions_per_token(batches: list[list[int]]) -> float:
    """What the batches cost (each padded to its longest row) per real token."""
    return sum(max(b) * len(b) for b in batches) / sum(sum(b) for b in batches)


def grouping_pads_less(train) -> None:
    """``train(strategy, batches)`` trains one epoch, appending each batch's row lengths to ``batches``."""
    cost = {}
    for strategy in STRATEGIES:
        batches: list[list[int]] = []
        train(strategy, batches)
        assert sum(len(b) for b in batches) == ROWS, batches[:5]  # one epoch: every row once
        cost[strategy] = positions_per_token(batches)
    assert cost["random"] > 1.1 and cost["group_by_length"] < 1.05, cost


def recording(monkeypatch, collator, batches: list[list[int]]) -> None:
    original = collator.__call__

    def record(self, examples):
        batches.append([len(e["input_ids"]) for e in examples])
        return original(self, examples)

    monkeypatch.setattr(collator, "__call__", record)


def varied_rows(n: int) -> list[dict]:
    """The capture tests' kept answers, each question lengthened by 0-8 "+0" terms: rows of nine lengths."""
    return [{**r, "question": r["question"] + "+0+0" * (i % 9)} for i, r in enumerate(kept_rows(n))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The teacher's top-5 on ``varied_rows``, through the capture stage; the teacher's folder and tokenizer."""
    from tasks.capture import capture_logits

    tmp = tmp_path_factory.mktemp("grouped")
    _, tokenizer = tiny_teacher(tmp / "teacher-model", sharpen=20.0)
    run_dir = tmp / "run"
    teacher = stage_ref(run_dir, "teacher", lambda d: write_location(d, str(tmp / "teacher-model")))
    rows = pd.DataFrame(varied_rows(ROWS))
    curated = stage_ref(run_dir, "curate", lambda d: rows.to_parquet(d / "kept.parquet"))
    ref = capture_logits.fn(run_dir, LogitCacheSection(k=5, shard_rows=16), TEMPLATE, teacher, curated)
    return LogitCache.open(ref.path, expect_tokenizer=tokenizer), tmp / "teacher-model", tokenizer


def chats() -> list[dict]:
    return [
        {"row_id": f"r{i}", **chat(f"Solve step by step: {r['question']}", r["text"])}
        for i, r in enumerate(varied_rows(ROWS))
    ]


def test_sft_batches_come_grouped_by_length(cache, tmp_path, monkeypatch):
    _, _, tok = cache
    rows = [{k: v for k, v in r.items() if k != "row_id"} for r in chats()]
    trainer_class = sft.chunked_sft_trainer()

    def train(strategy, batches):
        class Recording(trainer_class):
            def training_step(self, model, inputs, num_items_in_batch=None):
                batches.append(inputs["attention_mask"].sum(-1).tolist())
                return super().training_step(model, inputs, num_items_in_batch)

        monkeypatch.setattr(sft, "chunked_sft_trainer", lambda: Recording)
        config = trainer_config({**ONE_EPOCH, "train_sampling_strategy": strategy}, tmp_path / strategy, 0)
        sft.train_sft(kd_student(tok), tok, rows, config, tmp_path / strategy)

    grouping_pads_less(train)


def test_offline_kd_batches_come_grouped_by_length(cache, tmp_path, monkeypatch):
    cache, _, tok = cache

    def train(strategy, batches):
        recording(monkeypatch, CachedLogitsCollator, batches)
        training = {**ONE_EPOCH, "train_sampling_strategy": strategy}
        train_offline_kd(
            kd_student(tok), tok, None, kd_config(cache, training, tmp_path / strategy), tmp_path / strategy
        )

    grouping_pads_less(train)


def test_on_policy_prompts_come_grouped_by_length(cache, tmp_path, monkeypatch):
    _, folder, tok = cache

    def train(strategy, batches):
        recording(monkeypatch, OnPolicyCollator, batches)
        training = {**ONE_EPOCH, "train_sampling_strategy": strategy}
        config = op_config(settings(), folder, None, training, tmp_path / strategy)
        train_on_policy(on_policy_student(tok), tok, chats(), config, tmp_path / strategy)

    grouping_pads_less(train)
