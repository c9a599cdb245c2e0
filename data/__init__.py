"""Data: tokenizer, chat template, sources and grain pipelines."""
