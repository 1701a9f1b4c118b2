"""Width pruning on a real model: SmolLM2-135M-Instruct (the registry GGUF, dequantized to float32) pruned to 15 of its
30 layers by ShortGPT block influence, as recipes/smollm2.yaml prunes its students, then to smaller MLP widths by
Minitron's activation importance (kdflow/models/pruning.py); both measured once on the teacher over the study's 64
calibration rows (its train split, seed 0, through prompts/instruct.jinja and the chat template, ≤ 256 tokens each).

For the teacher and each pruned copy, untrained (the floor a KD student starts from): parameters, and the perplexity
of the human references of the first ``--rows`` Self-Instruct user-oriented instructions of the study's test split
(the evaluate stage's ``score_reference``: teacher-forced on the answer tokens, prompt through the chat template).
A control: the smallest width with channels drawn at random (seed 0) instead of by importance. Prints the table, then,
last, the ratio of the smallest width's floor perplexity to the full width's.

    python benchmarks/width_pruning.py [--widths 1536,1024,768] [--rows 32] [--teacher MODEL_FOLDER]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.results import options, save  # noqa: E402

LAYERS, CALIBRATION_ROWS, CALIBRATION_TOKENS = 15, 64, 256  # recipes/smollm2.yaml's init


def teacher_folder(given: str, scratch: Path) -> Path:
    """``given`` (an imported SmolLM2 folder, e.g. a run's import-gguf/<key>/model), else the GGUF imported here."""
    if given:
        return Path(given)
    from kdflow.models.gguf import import_gguf
    from kdflow.models.smollm2 import gguf_path

    import_gguf(gguf_path(), scratch / "teacher", "float32")
    return scratch / "teacher"


def main() -> None:
    args = options(__doc__, widths="1536,1024,768", rows=32, teacher="", batch_size=8, threads=1)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.instructions import load_splits
    from kdflow.evaluation.quality import reference_sequences, score_reference
    from kdflow.models.pruning import (
        block_influence,
        channel_importance,
        keep_channels,
        keep_layers,
        most_influential,
        top_channels,
    )
    from tasks.models import calibration_batches

    torch.set_num_threads(args.threads)
    template = (ROOT / "prompts" / "instruct.jinja").read_text()
    splits = load_splits(
        ROOT / "data/t0-short/prompts.jsonl",
        ROOT / "data/self-instruct/user_oriented_instructions.jsonl",
        {"train": 320, "test": 252},
        seed=0,
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = teacher_folder(args.teacher, Path(scratch))
        teacher, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    teacher.eval()
    batches, tokens = calibration_batches(tokenizer, splits["train"][:CALIBRATION_ROWS], template, CALIBRATION_TOKENS)
    start = time.perf_counter()
    kept = most_influential(block_influence(teacher, batches), LAYERS)
    scores = channel_importance(teacher, batches)
    calibration_seconds = time.perf_counter() - start
    references = reference_sequences(tokenizer, splits["test"][: args.rows], template)
    answer_tokens = sum(len(ids) - first for ids, first in references)

    def measured(name: str, model) -> dict:
        begin = time.perf_counter()
        with torch.no_grad():
            ppl = score_reference(model, tokenizer, references, args.batch_size)["perplexity"]
        params = sum(p.numel() for p in model.parameters())
        row = {"model": name, "params": params, "share": params / teacher_params, "perplexity": ppl}
        print(f"{name:<28} {params:>12,} {row['share']:>7.1%} {ppl:>11.2f}   ({time.perf_counter() - begin:.0f} s)")
        return row

    teacher_params = sum(p.numel() for p in teacher.parameters())
    print(f"calibration: {CALIBRATION_ROWS} rows, {tokens:,} tokens, {calibration_seconds:.0f} s; layers kept {kept}")
    print(f"references: {args.rows} Self-Instruct rows, {answer_tokens:,} answer tokens\n")
    print(f"{'model':<28} {'parameters':>12} {'share':>7} {'perplexity':>11}")
    rows = [measured("teacher (30 layers, 1536)", teacher)]
    depth = keep_layers(teacher, kept)
    for width in (int(w) for w in args.widths.split(",")):
        model = depth if width == teacher.config.intermediate_size else None
        if model is None:
            model = keep_channels(depth, [top_channels(scores[i], width) for i in kept])
        rows.append(measured(f"pruned ({LAYERS} layers, {width})", model) | {"mlp_width": width})
    # The control: as many channels drawn at random (seeded) in each layer, at the smallest width.
    generator = torch.Generator().manual_seed(0)
    n = teacher.config.intermediate_size
    drawn = [sorted(torch.randperm(n, generator=generator)[:width].tolist()) for _ in kept]
    control = measured(f"  random channels ({width})", keep_channels(depth, drawn)) | {"mlp_width": width}
    result = {
        "teacher": "SmolLM2-135M-Instruct (Q4_1 GGUF, float32)",
        "layers_kept": kept,
        "calibration_rows": CALIBRATION_ROWS,
        "calibration_tokens": tokens,
        "reference_rows": args.rows,
        "answer_tokens": answer_tokens,
        "threads": args.threads,
        "rows": rows,
        "random_channels": control,
        "perplexity_ratio_smallest_to_full_width": rows[-1]["perplexity"] / rows[1]["perplexity"],
    }
    print(f"\nresults: {save('width_pruning', result)}")
    print(
        f"floor perplexity, width {rows[-1]['mlp_width']} / width {rows[1]['mlp_width']}: "
        f"{result['perplexity_ratio_smallest_to_full_width']:.3f}"
    )


if __name__ == "__main__":
    main()
