"""Evaluation metrics: FID, LPIPS diversity, faithfulness-weighted variance, fidelity."""
