"""Downstream evaluation: segmentation, detection, linear probing, fine-tuning, zero-shot tasks."""
