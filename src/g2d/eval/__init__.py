"""Evaluation: retrieval and zero-shot grounding (more tasks arrive with the downstream suite)."""
