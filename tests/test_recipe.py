"""The training recipe's options: initialisation, learning-rate schedule, the distance of the last rounds, weight
average (EMA), rejection sampling."""

import math

import pytest
import torch
from safetensors.torch import load_file

from chimle.adaptive import AdaptiveState, data_point
from chimle.blocks import WNConv2d
from chimle.checkpoint import load_state
from chimle.config import ConfigError, resolve
from chimle.ema import WeightAverage
from chimle.generator import Generator, initialise
from chimle.perceptual import LPIPS, Distance
from chimle.search import hierarchical_search, reject
from chimle.tasks import get
from chimle.train import draw_round, learning_rate_factor, search_round, train, training_set
from conftest import metric_records, randomize, run_killed, tiny_config
from test_search import planted_targets


def test_official_initialisation_zeroes_biases_and_scales_linear_layers():
    cfg = tiny_config("super-resolution", "model.style_dim=256", "model.code_dim=256").model
    torch.manual_seed(0)
    g = initialise(Generator(cfg), "official")
    convs = [m for m in g.modules() if isinstance(m, WNConv2d)]
    assert convs and all(torch.all(c.bias == 0) for c in convs)
    for c in convs:  # weight norm keeps g = ||v||: the convolutions' weights are PyTorch's default
        torch.testing.assert_close(c.weight_g.flatten(), c.weight_v.flatten(1).norm(dim=1))
    linears = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.all(m.bias == 0) for m in linears)
    wide = [m for m in linears if m.in_features >= 256]
    for m in wide:  # kaiming-normal (fan-in, gain sqrt 2) x 0.1
        expected = 0.1 * math.sqrt(2 / m.in_features)
        assert abs(m.weight.std().item() / expected - 1) < 0.1, (m, m.weight.std().item(), expected)
    styles = [a for level in g.levels for a in level.style.affine]
    assert all(a.weight.abs().sum() > 0 for a in styles)  # official: small, not zero


def test_pytorch_initialisation_starts_the_style_as_a_plain_instance_norm():
    torch.manual_seed(0)
    g = initialise(Generator(tiny_config().model), "pytorch")
    assert all(torch.all(a.weight == 0) and torch.all(a.bias == 0) for level in g.levels for a in level.style.affine)
    assert any(torch.any(m.bias != 0) for m in g.modules() if isinstance(m, WNConv2d))


def test_learning_rate_schedules():
    t = tiny_config("super-resolution", "train.schedule=cosine", "train.lr_final=0.1", "train.warmup=4").train
    factors = [learning_rate_factor(t, step, 101) for step in range(101)]
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 100)) for s in range(101)]
    assert factors[:4] == pytest.approx([(s + 1) / 4 * cosine[s] for s in range(4)])  # linear warm-up
    assert factors[4:] == pytest.approx(cosine[4:])
    assert factors[50] == pytest.approx(0.55)
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    constant = tiny_config("super-resolution").train
    assert {learning_rate_factor(constant, s, 50) for s in range(50)} == {1.0}


def test_stable_decay_holds_the_rate_then_decays_over_the_last_rounds():
    t = tiny_config("super-resolution", "train.schedule=stable-decay", "train.decay_rounds=2",
                    "train.steps_per_round=10", "train.lr_final=0.2").train
    factors = [learning_rate_factor(t, step, 60) for step in range(60)]
    assert factors[:40] == [1.0] * 40  # rounds 0-3 of 6 at the full rate
    assert factors[40:] == pytest.approx([0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * s / 19)) for s in range(20)])
    # Extending the run to 8 rounds moves the decay to its new end: the first 6 rounds are as a constant run's.
    assert [learning_rate_factor(t, step, 80) for step in range(60)] == [1.0] * 60


def test_the_last_rounds_search_and_train_with_the_final_distance_and_resume_exactly(tmp_path):
    settings = ["train.rounds=3", "train.steps_per_round=4", "train.checkpoint_every=2"]
    switching = [*settings, "train.final_perceptual=vgg", "train.final_rounds=1"]
    plain, whole, killed = tmp_path / "plain", tmp_path / "whole", tmp_path / "killed"
    train(tiny_config("super-resolution", *settings), plain)
    train(tiny_config("super-resolution", *switching), whole)
    a, b = metric_records(plain), metric_records(whole)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        key = "distance_per_level" if x["event"] == "search" else "loss_per_level"
        same = x[key] == y[key]
        assert same == (x["round"] < 2), (x, y)  # AlexNet's distance until the last round, then VGG's
    # Killed in the last round before its first checkpoint: the resumed run searches that round again, with VGG.
    run_killed(killed, "step:9", switching)
    train(tiny_config("super-resolution", *switching), killed, resume=True)
    wa, wb = load_file(str(whole / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_weight_average_follows_the_weights_with_a_warm_up_of_its_decay():
    module = torch.nn.Linear(3, 2)
    average = WeightAverage(module, decay=0.99)
    assert average.decay_at(0) == pytest.approx(0.1) and average.decay_at(1000) == 0.99
    start = average.module.weight.detach().clone()
    with torch.no_grad():
        module.weight.add_(1.0)
    average.update(module, 0)  # 0.1 * start + 0.9 * (start + 1)
    torch.testing.assert_close(average.module.weight, start + 0.9)
    average.update(module, 1)  # decay 2/11
    torch.testing.assert_close(average.module.weight, start + 1 - 0.1 * 2 / 11)
    assert not any(p.requires_grad for p in average.module.parameters())


def test_model_file_holds_the_average_and_the_state_both(tmp_path):
    out = tmp_path / "run"
    train(tiny_config("super-resolution", "train.ema=0.9", "train.rounds=1", "train.passes=1"), out)
    model = load_file(str(out / "model.safetensors"))
    state = load_state(sorted(out.glob("state-*.pt"))[-1])
    assert all(torch.equal(model[k], state["average"][k]) for k in model)
    assert any(not torch.equal(model[k], state["generator"][k]) for k in model)


def test_rejection_keeps_the_nearest_candidate_at_or_beyond_the_threshold():
    scores = torch.tensor([[0.01, 0.20, 0.10, float("inf")],  # 0.01 rejected: 0.10 wins
                           [0.01, 0.02, 0.03, float("inf")],  # every finite candidate rejected: the nearest wins
                           [0.50, 0.40, 0.05, 0.30]])         # exactly at the threshold: kept
    chosen = reject(scores, 0.05).argmin(dim=1)
    assert chosen.tolist() == [2, 0, 2]
    assert torch.equal(reject(scores, 0.0), scores)


def test_search_with_rejection_skips_a_candidate_equal_to_the_target():
    cfg = tiny_config("super-resolution", "model.levels=2", "data.crop=32")
    g = randomize(Generator(cfg.model), 3).eval().requires_grad_(False)
    task, lpips = get("super-resolution"), LPIPS("alex")
    inputs = [torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))]
    seeds = torch.tensor([21, 22])
    targets = planted_targets(g, task, inputs, seeds, [8, 8], [[3, 5], [6, 1]])
    plain = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 8])
    assert plain.winners.tolist() == [[3, 5], [6, 1]]
    rejected = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 8], reject_below=[1e-4, 0.0])
    assert rejected.winners[:, 0].tolist() != [3, 6] and torch.all(rejected.distances[:, 0] >= 1e-4)
    everything = hierarchical_search(g, lpips, task, inputs, targets, seeds, [8, 8], reject_below=[100.0])
    assert torch.equal(everything.winners, plain.winners)  # all rejected at every level: plain IMLE's choice


def test_recipe_settings_are_validated():
    assert tiny_config("super-resolution", "search.reject_below=0.05").search.reject_below == [0.05]
    assert tiny_config("super-resolution", "search.reject_below=[0, 1e-2]").search.reject_below == [0.0, 0.01]
    for override, message in [("search.reject_below=[0.1,0.1,0.1]", "one per level"),
                              ("search.reject_below=-1", "needs one value >= 0"),
                              ("search.reject_below=[a]", "must be like"),
                              ("train.schedule=linear", "train.schedule='linear' must be one of"),
                              ("train.ema=1", r"train.ema=1.0 must be in \[0, 1\)"),
                              ("train.init=xavier", "train.init='xavier' must be one of"),
                              ("train.lr_final=2", r"lr_final=2.0 in \[0, 1\]"),
                              ("train.schedule=stable-decay", "decay_rounds=0 must be >= 1"),
                              ("train.decay_rounds=3", "0 with any other schedule"),
                              ("train.final_perceptual=vgg", "final_rounds=0 must be >= 1"),
                              ("train.final_rounds=2", "0 without it"),
                              ("train.final_perceptual=resnet", "must be 'vgg', 'alex' or ''"),
                              ("search.adaptive=true", "needs a fixed set of examples"),
                              ("train.examples=5", "multiple of train.round_size"),
                              ("search.adaptive_min_visits=40", "adaptive_min_visits=40 <= adaptive_max_visits=30")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config("super-resolution", override)
    # RS-IMLE's thresholds and adaptive IMLE's are distances in the search's units, which a switch would change.
    for override in ["search.reject_below=0.1", "search.adaptive=true"]:
        with pytest.raises(ConfigError, match="train.final_perceptual changes the search distance's units"):
            tiny_config("super-resolution", "train.examples=8", override, "train.final_perceptual=vgg",
                        "train.final_rounds=1")
    # `small` switches for decompression: the refusal names the overrides that turn the switch off, and they do.
    rs_imle = ["search.reject_below=0.1"]
    with pytest.raises(ConfigError, match="add -o train.final_perceptual= -o train.final_rounds=0"):
        resolve(task="decompression", preset="small", overrides=rs_imle)
    config = resolve(task="decompression", preset="small",
                     overrides=[*rs_imle, "train.final_perceptual=", "train.final_rounds=0"])
    assert config.search.reject_below and not config.train.final_perceptual


def test_a_fixed_set_of_examples_is_visited_once_per_pass_in_a_new_order():
    passes = [[data_point(7, n, 8) for n in range(p * 8, (p + 1) * 8)] for p in range(3)]
    assert all(sorted(p) == list(range(8)) for p in passes)
    assert passes[0] != passes[1] != passes[2]
    assert passes == [[data_point(7, n, 8) for n in range(p * 8, (p + 1) * 8)] for p in range(3)]


def test_adaptive_thresholds_and_visits():
    state = AdaptiveState.empty(4, [3, 3])
    ids = torch.tensor([0, 1, 2, 3])
    inf = float("inf")
    assert state.due(ids, torch.full((4,), inf), 2, 5).all()  # no code yet: every example is searched
    state.update(ids, torch.ones(4, dtype=torch.bool), torch.tensor([10, 11, 12, 13]), torch.ones(4, 2, dtype=torch.long),
                 torch.full((4,), inf), torch.tensor([1.0, 2.0, 3.0, 4.0]), shrink=0.5)
    assert state.thresholds.tolist() == [0.5, 1.0, 1.5, 2.0] and state.visits.tolist() == [0, 0, 0, 0]
    current = torch.tensor([0.4, 1.5, 1.0, 9.0])  # examples 0 and 2 beat their thresholds, 1 and 3 do not
    assert state.due(ids, current, 2, 5).tolist() == [False] * 4  # but only one visit has passed
    state.visits[:] = 1
    assert state.due(ids, current, 2, 5).tolist() == [True, False, True, False]
    state.visits[3] = 4
    assert state.due(ids, current, 2, 5).tolist() == [True, False, True, True]  # the fifth visit: searched anyway
    searched = torch.tensor([True, False, True, True])
    state.update(ids, searched, torch.tensor([20, 21, 22, 23]), torch.zeros(4, 2, dtype=torch.long), current,
                 torch.zeros(4), shrink=0.5)
    assert state.seeds.tolist() == [20, 11, 22, 23] and state.visits.tolist() == [0, 2, 0, 0]
    assert state.thresholds.tolist() == pytest.approx([0.2, 1.0, 0.5, 4.5])  # (1 - shrink) x the distance reached before


def test_adaptive_search_keeps_codes_until_they_are_due():
    config = tiny_config("super-resolution", "train.examples=4", "train.round_size=4", "search.adaptive=true",
                         "search.adaptive_min_visits=2", "search.adaptive_max_visits=2")
    dataset = training_set(config)
    torch.manual_seed(0)
    generator = Generator(config.model)
    distance = Distance(LPIPS("alex"))
    state = AdaptiveState.empty(4, config.search.samples_per_level)
    results = []
    for number in range(3):  # three passes over the four examples
        batch = draw_round(config, dataset, number, torch.device("cpu"))
        result = search_round(config, generator, distance, batch, adaptive=state)
        results.append(dict(zip(batch.ids.tolist(), result.seeds.tolist())))
    assert results[1] == results[0]  # second visit: every code kept (the weights did not change: none beat 0.96 d)
    assert all(results[2][i] != results[1][i] for i in range(4))  # third: the visit limit, all searched again
    assert state.visits.tolist() == [0, 0, 0, 0]


def test_adaptive_run_resumes_exactly(tmp_path):
    settings = ["train.rounds=4", "train.round_size=4", "train.steps_per_round=3", "train.checkpoint_every=2",
                "train.examples=8", "search.adaptive=true", "search.adaptive_min_visits=1",
                "search.adaptive_max_visits=2"]
    whole = tmp_path / "whole"
    train(tiny_config("super-resolution", *settings), whole)
    killed = tmp_path / "killed"
    run_killed(killed, "step:7", settings)
    train(tiny_config("super-resolution", *settings), killed, resume=True)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_state(sorted(r.glob("state-*.pt"))[-1])["adaptive"] for r in (whole, killed))
    assert all(torch.equal(sa[k], sb[k]) for k in ("seeds", "winners", "thresholds", "visits"))
