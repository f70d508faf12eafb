"""chimle: multimodal conditional image synthesis with Conditional Hierarchical IMLE."""

__version__ = "0.1.0"
