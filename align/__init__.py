"""Post-training (alignment) data: the Llama 3 chat format and TRL-compatible JSONL readers and writers."""
