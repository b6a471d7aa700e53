"""Data: chat template and label spans, tokenizers, shards and the datamodule."""
