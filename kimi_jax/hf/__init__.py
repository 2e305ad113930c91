"""Hugging Face checkpoints: the declarative tensor mapping, safetensors reading/writing, and loading an HF folder
into a model. The converters in `convert/` are thin command lines over this package."""
