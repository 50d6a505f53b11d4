"""From a plan to a smaller model: extraction (in memory or streamed) and the conditional depth search."""
