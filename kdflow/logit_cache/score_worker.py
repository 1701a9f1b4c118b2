"""The HF teacher's scoring process (``kdflow.logit_cache.scoring.HFScorer`` starts it): load the teacher once,
then answer each pickled list of ``EncodedRow`` on stdin with the pickled list of their ``TopK`` on stdout, until
stdin closes.

    python -m kdflow.logit_cache.score_worker MODEL_DIR K THREADS BATCH_TOKENS

Messages are ``(kind, value)``: ``("ready", None)`` once the teacher is loaded, then ``("topk", [...])`` per
request, or ``("error", text)`` for a request it could not score. Anything else printed to stdout would corrupt
the channel, so the channel is a copy of the original stdout and stdout itself goes to stderr.
"""

from __future__ import annotations

import os
import pickle
import sys


def main(argv: list[str]) -> None:
    model_dir, k, threads, batch_tokens = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (libraries') go to the log, not the channel
    requests = sys.stdin.buffer

    import torch

    from kdflow.logit_cache import topk
    from kdflow.teacher.hf_generate import load

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load(model_dir)
    pad = tokenizer.pad_token_id or 0

    def send(kind: str, value) -> None:
        pickle.dump((kind, value), channel, protocol=pickle.HIGHEST_PROTOCOL)
        channel.flush()

    send("ready", None)
    while True:
        try:
            rows = pickle.load(requests)
        except EOFError:
            return  # the trainer closed the pipe (or died): done
        try:
            result = topk.hf_topk(model, rows, k, batch_tokens=batch_tokens, pad_id=pad)
        except (ValueError, RuntimeError, IndexError) as e:  # a bad request: say so, keep serving
            send("error", f"{type(e).__name__}: {e}")
            continue
        send("topk", result)


if __name__ == "__main__":
    main(sys.argv[1:])
