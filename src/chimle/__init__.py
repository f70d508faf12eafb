"""chimle: multimodal conditional image synthesis with Conditional Hierarchical IMLE."""

__version__ = "0.1.0"


def load(path, device=None, tile=None, overlap=8, tile_stats="image"):
    """A trained model (run directory or .safetensors file) ready to sample: `model.sample(image, n, seed)`,
    `model.vary(image, seed, keep_levels, n)`, `model.render(image, sources)`; see chimle.sample.Model. With
    `tile` (input px), inputs larger than a tile are rendered tile by tile (see chimle.tiling)."""
    from chimle.sample import Model

    return Model.load(path, device, tile, overlap, tile_stats)
