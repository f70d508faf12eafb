"""train.compile: the step's forward and backward through torch.compile train the same model as eager
PyTorch, and a compiled run stopped and resumed reaches the weights of an uninterrupted compiled run.
search.compile: the compiled search chooses the eager search's codes, with one graph per level.

Marked slow: compiling even the tiny model takes minutes on a 2-core CPU the first time (CI runs it in its
second step)."""

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from chimle.generator import Generator
from chimle.perceptual import LPIPS
from chimle.search import flat_search, hierarchical_search
from chimle.tasks import get, pyramid
from chimle.train import c_compiler, train
from conftest import randomize, tiny_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(c_compiler() is None, reason="torch.compile needs a C++ compiler on a CPU")]

SETTINGS = ["train.rounds=2", "train.round_size=4", "train.steps_per_round=4", "train.checkpoint_every=2",
            "train.grid_every=100"]


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_compiled_step_trains_the_eager_model_and_resumes_exactly(tmp_path):
    eager, compiled, stopped = tmp_path / "eager", tmp_path / "compiled", tmp_path / "stopped"
    train(tiny_config("super-resolution", *SETTINGS), eager)
    graphs = counters["stats"]["unique_graphs"]
    train(tiny_config("super-resolution", *SETTINGS, "train.compile=true"), compiled)
    assert counters["stats"]["unique_graphs"] == graphs + 1, "the step should compile to one graph"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    a, b = weights(eager), weights(compiled)
    assert a.keys() == b.keys()
    # 8 Adam steps at lr 0.002 from the same start: compiled kernels reorder sums, nothing more.
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-3, f"compiled and eager weights differ by {worst}"

    # One round, then resumed for the second: the same weights as the uninterrupted compiled run, bit for bit.
    train(tiny_config("super-resolution", *SETTINGS[1:], "train.rounds=1", "train.compile=true"), stopped)
    train(None, stopped, resume=True, settings={"train": {"rounds": 2}})
    c = weights(stopped)
    different = [k for k in b if not torch.equal(b[k], c[k])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"


def test_compiled_search_chooses_the_eager_winners_with_one_graph_per_level():
    cfg = tiny_config("super-resolution", "model.levels=3", "model.channels=[8,8,8]", "model.growth=[8,8,8]",
                      "search.samples_per_level=[9,7,5]")
    g = randomize(Generator(cfg.model), 5).eval().requires_grad_(False)
    lpips, task = LPIPS("alex"), get("super-resolution")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    inputs, targets = [torch.nn.functional.avg_pool2d(images, 8)], pyramid(images, 3)
    seeds, pools = torch.tensor([7, 8, 9, 10]), [9, 7, 5]  # batches of 6 leave partial ones (36 = 6 x 6, 28, 20)

    def search(compile: bool):
        return hierarchical_search(g, lpips, task, inputs, targets, seeds, pools, max_batch=6, compile=compile)

    eager = search(False)
    graphs = counters["stats"]["unique_graphs"]
    compiled = search(True)
    assert counters["stats"]["unique_graphs"] == graphs + len(pools), "one graph per level, partial batches padded"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert torch.equal(compiled.winners, eager.winners)
    torch.testing.assert_close(compiled.distances, eager.distances, atol=1e-5, rtol=1e-4)
    assert len(set(eager.winners.flatten().tolist())) > 2  # not a trivial agreement

    # Training changes the weights, not the graphs: new weights search again without compiling.
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(0.9)
    assert torch.equal(search(True).winners, search(False).winners)
    assert counters["stats"]["unique_graphs"] == graphs + len(pools)

    flat = [flat_search(g, lpips, task, inputs, targets, seeds, 5, max_batch=6, compile=c) for c in (False, True)]
    assert torch.equal(flat[0].winners, flat[1].winners)
