"""How a model is judged: held-out perplexity and size, zero-shot tasks, and predicted quality."""
