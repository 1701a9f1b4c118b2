"""White-box KD data: the teacher's top-k distributions, captured and stored compactly."""
