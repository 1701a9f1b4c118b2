"""Students: losses, one trainer module per method, LoRA, tokenizer compatibility, the training CLI."""
