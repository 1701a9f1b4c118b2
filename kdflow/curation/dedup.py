"""Exact and near-duplicate detection. Near duplicates: MinHash over word n-grams with datasketch's LSH
index, so each text is compared only with the few that share a band (not all n² pairs), and a candidate is
confirmed on the estimated Jaccard similarity before it counts.

Both return, for each text, the index of the earlier text it duplicates (or of the reference text, for
``against``), or None: the first occurrence is kept, later copies point at it.
"""

from __future__ import annotations

import hashlib
import re

from datasketch import LeanMinHash, MinHash, MinHashLSH

WORD_RE = re.compile(r"\w+")
CHUNK = 10_000


def normalize(text: str) -> str:
    """Case, punctuation and spacing do not make two texts different."""
    return " ".join(WORD_RE.findall(text.lower()))


def exact_duplicates(texts: list[str]) -> list[int | None]:
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, text in enumerate(texts):
        digest = hashlib.sha1(normalize(text).encode()).hexdigest()
        out.append(first.get(digest))
        first.setdefault(digest, i)
    return out


def shingles(text: str, ngram: int) -> set[bytes]:
    words = normalize(text).split()
    if len(words) <= ngram:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + ngram]).encode() for i in range(len(words) - ngram + 1)}


def minhashes(texts: list[str], ngram: int, num_perm: int) -> list[LeanMinHash]:
    # MinHash.bulk draws the random permutations once; a MinHash per text redraws them every time (3x slower).
    return MinHash.bulk([list(shingles(t, ngram)) for t in texts], num_perm=num_perm, seed=1) if texts else []


def near_duplicates(
    texts: list[str], threshold: float = 0.8, ngram: int = 3, num_perm: int = 128, against: list[str] = ()
) -> list[tuple[str, int] | None]:
    """For each text, ``("against", j)`` when it is near ``against[j]``, ``("text", i)`` when it is near an
    earlier kept ``texts[i]``, or None. Near: estimated Jaccard similarity of word n-gram sets >= threshold.
    A text found to be a duplicate is not indexed, so chains (a~b, b~c) do not drop c for a's sake."""
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes: dict[str, LeanMinHash] = {}
    for j, m in enumerate(minhashes(list(against), ngram, num_perm)):
        hashes[f"a{j}"] = m
        lsh.insert(f"a{j}", m)
    out: list[tuple[str, int] | None] = []
    for start in range(0, len(texts), CHUNK):  # chunks: the hashes of dropped texts are not all held at once
        for i, m in enumerate(minhashes(texts[start : start + CHUNK], ngram, num_perm), start):
            match = _best(m, lsh.query(m), hashes, threshold)
            if match is None:
                hashes[f"t{i}"] = m
                lsh.insert(f"t{i}", m)
                out.append(None)
            else:
                out.append(("against" if match[0] == "a" else "text", int(match[1:])))
    return out


def _best(m: LeanMinHash, candidates: list[str], hashes: dict[str, LeanMinHash], threshold: float) -> str | None:
    # LSH returns likely matches; the estimated Jaccard confirms them (the reference first, then the earliest).
    scored = [(c, m.jaccard(hashes[c])) for c in candidates]
    confirmed = sorted((c for c, s in scored if s >= threshold), key=lambda c: (c[0] != "a", int(c[1:])))
    return confirmed[0] if confirmed else None
