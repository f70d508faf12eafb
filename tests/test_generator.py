from pathlib import Path

import pytest
import torch

from chimle.blocks import folded
from chimle.config import ConfigError, resolve
from chimle.generator import Generator, count_parameters, upsample_image
from conftest import randomize, tiny_config


def inputs_for(generator, n, size, rng):
    cfg = generator.cfg
    if cfg.wiring == "super-resolution":
        return [torch.rand(n, cfg.in_channels, size, size, generator=rng)]
    return [
        torch.rand(n, cfg.in_channels, size // 2 ** (cfg.levels - 1 - l), size // 2 ** (cfg.levels - 1 - l), generator=rng)
        for l in range(cfg.levels)
    ]


def codes_for(generator, inputs, rng, n=None):
    sizes = generator.code_sizes(generator.start(inputs))
    n = n or inputs[0].shape[0]
    return [torch.randn(n, s, generator=rng) for s in sizes]


@pytest.mark.parametrize(
    "task, size, expected",
    [
        ("super-resolution", 4, [(3, 8, 8), (3, 16, 16), (3, 32, 32)]),
        ("decompression", 16, [(3, 4, 4), (3, 8, 8), (3, 16, 16)]),
        ("colourization", 16, [(2, 4, 4), (2, 8, 8), (2, 16, 16)]),
    ],
)
def test_output_shapes_per_level(task, size, expected, rng):
    cfg = tiny_config(task, "model.levels=3", "model.channels=[8,8,4]", "model.growth=[4,4,4]",
                      "search.samples_per_level=[2,2,2]")
    g = Generator(cfg.model)
    inputs = inputs_for(g, 2, size, rng)
    outputs = g(inputs, codes_for(g, inputs, rng))
    assert [tuple(o.shape[1:]) for o in outputs] == expected
    assert all(o.dtype == torch.float32 and o.device.type == "cpu" for o in outputs)
    assert all(o.abs().max() <= 1 for o in outputs)


def test_non_square_inputs_and_code_sizes(rng):
    cfg = tiny_config("super-resolution")
    g = Generator(cfg.model)
    inputs = [torch.rand(1, 3, 3, 5, generator=rng)]
    sizes = g.code_sizes(g.start(inputs))
    n = cfg.model.noise_channels
    assert sizes == [cfg.model.code_dim + n * 3 * 5, cfg.model.code_dim + n * 6 * 10]
    outputs = g(inputs, codes_for(g, inputs, rng))
    assert outputs[-1].shape == (1, 3, 12, 20)


@pytest.mark.parametrize("task, extra", [("super-resolution", []), ("decompression", []), ("colourization", []),
                                         ("super-resolution", ["model.predict_residual=true"]),
                                         ("decompression", ["model.predict_residual=true"])])
def test_prefix_rendering_equals_full_rendering(task, extra, rng):
    """Render levels < l once, then level l for many candidates: same as rendering each candidate in full."""
    cfg = tiny_config(task, "model.levels=3", "model.channels=[8,8,4]", "model.growth=[4,4,4]",
                      "search.samples_per_level=[2,2,2]", *extra)
    g = randomize(Generator(cfg.model), seed=3).eval()
    inputs = inputs_for(g, 2, 4 if task == "super-resolution" else 16, rng)
    prefix_codes = codes_for(g, inputs, rng)
    m = 5
    with torch.no_grad():
        prefix = g.start(inputs)
        for level in range(2):
            _, prefix = g.render_level(prefix, prefix_codes[level])
        candidates = torch.randn(2 * m, g.code_sizes(prefix)[2], generator=rng)
        fast, _ = g.render_level(prefix.repeat(m), candidates)
        for i in range(2):
            for j in range(m):
                one = [x[i : i + 1] for x in inputs]
                codes = [c[i : i + 1] for c in prefix_codes[:2]] + [candidates[i * m + j : i * m + j + 1]]
                full = g(one, codes)[2]
                torch.testing.assert_close(fast[i * m + j : i * m + j + 1], full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["super-resolution", "decompression"])
def test_an_untrained_residual_tower_outputs_its_input_brought_to_size_and_learns_a_correction(task, rng):
    cfg = tiny_config(task, "model.predict_residual=true")
    g = Generator(cfg.model)
    inputs = inputs_for(g, 2, 4 if task == "super-resolution" else 16, rng)
    codes = codes_for(g, inputs, rng)
    outputs = g(inputs, codes)
    expected = inputs[0]
    for level, out in enumerate(outputs):
        expected = upsample_image(expected) if task == "super-resolution" else inputs[level]
        assert torch.equal(out, expected)

    # The zero correction still gets a gradient: one step makes the output depend on the code.
    sum((out - torch.rand_like(out)).abs().mean() for out in outputs).backward()
    assert all(level.out.weight_g.grad.abs().sum() > 0 for level in g.levels)
    with torch.no_grad():
        for level in g.levels:
            level.out.weight_g.sub_(0.1 * level.out.weight_g.grad.sign())
        a = g(inputs, codes)[-1]
        b = g(inputs, [torch.randn_like(c) for c in codes])[-1]
    assert not torch.equal(a, expected) and not torch.equal(a, b)


def test_predict_residual_is_refused_where_outputs_are_not_like_inputs():
    for task in ("colourization", "layout"):
        with pytest.raises(ConfigError, match="predict_residual=true adds each level's output to its image input"):
            tiny_config(task, "model.predict_residual=true")


def test_coarse_code_changes_every_finer_level_and_fine_code_only_its_own(rng):
    cfg = tiny_config("super-resolution")
    g = randomize(Generator(cfg.model), seed=5).eval()
    inputs = inputs_for(g, 1, 4, rng)
    codes = codes_for(g, inputs, rng)
    with torch.no_grad():
        base = g(inputs, codes)
        fine = g(inputs, [codes[0], torch.randn_like(codes[1])])
        coarse = g(inputs, [torch.randn_like(codes[0]), codes[1]])
    assert torch.equal(base[0], fine[0]) and not torch.equal(base[1], fine[1])
    assert not torch.equal(base[0], coarse[0]) and not torch.equal(base[1], coarse[1])


def test_paper_preset_has_the_official_parameter_count():
    g = Generator(resolve(task="super-resolution", preset="paper").model)
    assert count_parameters(g) == 210_622_936


def test_fixed_seed_gives_identical_outputs(rng):
    cfg = tiny_config("super-resolution")

    def run():
        torch.manual_seed(7)
        g = Generator(cfg.model).eval()
        r = torch.Generator().manual_seed(11)
        inputs = inputs_for(g, 2, 4, r)
        with torch.no_grad():
            return g(inputs, codes_for(g, inputs, r))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_folded_weights_give_the_same_outputs(rng):
    cfg = tiny_config("decompression")
    g = randomize(Generator(cfg.model), seed=2).eval()
    inputs = inputs_for(g, 2, 16, rng)
    codes = codes_for(g, inputs, rng)
    with torch.no_grad():
        plain = g(inputs, codes)
        with folded(g):
            folded_outputs = g(inputs, codes)
    for a, b in zip(plain, folded_outputs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bad_shapes_are_refused_with_a_message(rng):
    g = Generator(tiny_config("super-resolution").model)
    with pytest.raises(ValueError, match="takes 1 input"):
        g.start([torch.rand(1, 3, 4, 4), torch.rand(1, 3, 8, 8)])
    with pytest.raises(ValueError, match=r"needs codes of shape \(1, "):
        g(inputs_for(g, 1, 4, rng), [torch.randn(1, 3)])


def test_source_never_moves_tensors_to_cuda_explicitly():
    source = Path(__file__).parents[1] / "src" / "chimle"
    offenders = [p.name for p in source.rglob("*.py") if ".cuda()" in p.read_text()]
    assert offenders == []
