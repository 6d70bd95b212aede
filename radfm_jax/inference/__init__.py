"""Inference: KV-cache decoding, batching of many prompts, input files, and store-split prediction."""
