"""`tokctl probe`: look inside a language model for text a fine-tune has hidden in it."""
