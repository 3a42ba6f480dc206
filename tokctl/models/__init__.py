"""Loading models and tokenizers: HF ids or folders, GGUF files, the embedded defaults."""
