"""Asking a teacher: the OpenAI-compatible client, a local vLLM server, HF generation, durable answer shards."""
