"""What a fit starts from: pretrained models (Hugging Face folders, GGUF, per-layer checkpoints),
corpora split by document, and models built from scratch."""
