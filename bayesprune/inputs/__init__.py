"""What a fit starts from: pretrained models (Hugging Face folders, GGUF, per-layer checkpoints),
and corpora split by document."""
