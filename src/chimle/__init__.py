"""chimle: multimodal conditional image synthesis with Conditional Hierarchical IMLE."""

__version__ = "0.1.0"


def load(path, device=None):
    """A trained model (run directory or .safetensors file) ready to sample; see chimle.sample.Model."""
    from chimle.sample import Model

    return Model.load(path, device)
