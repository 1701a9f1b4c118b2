"""Where models come from besides training: GGUF files imported into Hugging Face folders, the pinned registry copy
of SmolLM2-135M-Instruct, and students pruned from a teacher."""
