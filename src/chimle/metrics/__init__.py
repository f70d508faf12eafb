"""Evaluation metrics: FID/KID, precision/recall, density/coverage, conditional scores, LPIPS diversity,
faithfulness-weighted variance, fidelity; and the evaluation plot."""
