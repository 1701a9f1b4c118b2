"""The HF teacher's scoring process (``kdflow.logit_cache.scoring.HFScorer`` starts it): load the teacher once,
then answer each pickled list of ``EncodedRow`` on stdin with the pickled list of their ``TopK`` on stdout, until
stdin closes.

    python -m kdflow.logit_cache.score_worker MODEL_DIR K THREADS BATCH_TOKENS

Messages are ``(kind, value)``: ``("ready", None)`` once the teacher is loaded, then per request one
``("part", (indices, [TopK]))`` per padded batch as soon as it is scored and ``("done", None)`` after the last —
or ``("error", text)`` for a request it could not score, which ends that request. A thread of its own writes them,
so that the next batch is scored while the trainer, busy training on the last one, has not read it yet (a pipe
holds 64 KiB; one batch's top-k is more). Anything else printed to stdout would corrupt the channel, so the
channel is a copy of the original stdout and stdout itself goes to stderr.
"""

from __future__ import annotations

import os
import pickle
import queue
import sys
import threading


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

    outbox: queue.Queue = queue.Queue()

    def write() -> None:
        while (message := outbox.get()) is not None:
            try:
                pickle.dump(message, channel, protocol=pickle.HIGHEST_PROTOCOL)
                channel.flush()
            except (BrokenPipeError, OSError):
                os._exit(0)  # the trainer is gone: nobody to answer

    writer = threading.Thread(target=write, name="channel", daemon=True)
    writer.start()
    outbox.put(("ready", None))
    while True:
        try:
            rows = pickle.load(requests)
        except EOFError:  # the trainer closed the pipe (or died): send what is left, done
            outbox.put(None)
            writer.join()
            return
        try:
            for part in topk.hf_topk_parts(model, rows, k, batch_tokens=batch_tokens, pad_id=pad):
                outbox.put(("part", part))
        except (ValueError, RuntimeError, IndexError) as e:  # a bad request: say so, keep serving
            outbox.put(("error", f"{type(e).__name__}: {e}"))
            continue
        outbox.put(("done", None))


if __name__ == "__main__":
    main(sys.argv[1:])
