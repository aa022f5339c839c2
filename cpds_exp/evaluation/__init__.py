"""Evaluation: the metrics of an edit (CLIP score, LPIPS), the report of a sweep and its W&B form."""
