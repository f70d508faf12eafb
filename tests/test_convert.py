import pytest
import torch

from chimle.checkpoint import CheckpointError, load_model
from chimle.cli import main
from chimle.convert import convert_file, convert_state, to_official
from chimle.generator import Generator
from conftest import randomize, tiny_config
from official_reference import render

CASES = [("super-resolution", 4), ("decompression", 16), ("colourization", 16)]


def official_state(task, seed=0):
    """An official-named state dict with random weights (built through our naming, checked by the reference)."""
    cfg = tiny_config(task, "model.levels=3", "model.channels=[8,8,4]", "model.growth=[4,6,4]",
                      "search.samples_per_level=[2,2,2]", "model.mapping_layers=3")
    g = randomize(Generator(cfg.model), seed)
    state = to_official(g)
    if cfg.model.wiring == "generic":
        # The official generic tower also has an `up` block on its last level, never used.
        for name, shape in [("1.weight_v", (4, 4, 3, 3)), ("1.weight_g", (4, 1, 1, 1)), ("1.bias", (4,)),
                            ("3.weight_v", (4, 4, 3, 3)), ("3.weight_g", (4, 1, 1, 1)), ("3.bias", (4,))]:
            state[f"level_3_up.{name}"] = torch.randn(shape)
    return cfg, state


def net_input(task, cfg, size, rng):
    if task == "super-resolution":
        return [torch.rand(2, 3, size, size, generator=rng)]
    c = cfg.model.in_channels
    return [torch.rand(2, c, size >> (2 - l), size >> (2 - l), generator=rng) for l in range(3)]


@pytest.mark.parametrize("task, size", CASES)
def test_converted_model_reproduces_the_official_forward(task, size, rng, tmp_path):
    cfg, state = official_state(task)
    inputs = net_input(task, cfg, size, rng)
    prefixed = {f"module.{k}": v for k, v in state.items()}  # as saved from a DataParallel wrapper
    torch.save(prefixed, tmp_path / "official.pth")

    path = convert_file(tmp_path / "official.pth", task, tmp_path / "run")
    ours, loaded_cfg = load_model(path)
    assert loaded_cfg.model.channels == [8, 8, 4] and loaded_cfg.model.growth == [4, 6, 4]
    assert loaded_cfg.model.mapping_layers == 3 and loaded_cfg.model.noise_channels == cfg.model.noise_channels

    codes = [torch.randn(2, s, generator=rng) for s in ours.code_sizes(ours.start(inputs))]
    with torch.no_grad():
        raw = ours(inputs, codes)
        reference = render(state, task, inputs, codes, cfg.model.code_dim)
    for level, (r, ref) in enumerate(zip(raw, reference)):
        mine = torch.cat([inputs[level], r], 1) if task == "colourization" else (r + 1) / 2
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)


def test_missing_unexpected_and_misshapen_keys_are_listed():
    _, state = official_state("super-resolution")
    del state["level_2_style.sub.transform_0.bias"]
    state["level_1_extra.weight"] = torch.zeros(3)
    state["level_3_out.0.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as error:
        convert_state(state, "super-resolution")
    message = str(error.value)
    assert "missing levels.1.style.affine.0.bias" in message
    assert "unexpected level_1_extra.weight" in message
    assert "shape of levels.2.out.bias" in message


def test_wrong_task_and_foreign_files_are_refused(tmp_path):
    _, state = official_state("super-resolution")
    with pytest.raises(CheckpointError, match="predicts 3 channels but the 'colourization' task needs 2"):
        convert_state(state, "colourization")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not an official CHIMLE generator"):
        convert_file(tmp_path / "foreign.pth", "super-resolution", tmp_path / "out")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="loads safely"):
        convert_file(tmp_path / "junk.pth", "super-resolution", tmp_path / "out")


def test_incomplete_or_damaged_official_files_are_refused_in_one_line(tmp_path, capsys):
    _, state = official_state("super-resolution")
    for broken, message in (({k: v for k, v in state.items() if k != "level_1_out.0.weight_v"},
                             "the official file lacks 'level_1_out.0.weight_v'"),
                            ({**state, "level_1_feat.0.weight_v": torch.zeros(())}, "tensors of the wrong shape"),
                            ({k: v for k, v in state.items() if "transform_" not in k}, "describe no valid generator")):
        torch.save(broken, tmp_path / "official.pth")
        code = main(["convert", str(tmp_path / "official.pth"), "--task", "super-resolution",
                     "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
