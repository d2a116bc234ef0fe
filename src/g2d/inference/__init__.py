"""What a trained model answers without training anything: zero-shot classification from prompt
pairs, zero-shot grounding heat maps, image-text retrieval embeddings."""
