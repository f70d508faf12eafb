"""The mode-coverage metrics of benchmarks/modes.py on hand-made samples whose answers are known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chimle import builtin
from chimle.checkpoint import read_config
from chimle.search import SearchResult

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import modes  # noqa: E402

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture
def grey():
    return modes.texture(0, 0, size=16)


def test_every_mode_once_is_full_coverage_and_precision(grey):
    valid = modes.modes_of(grey)
    score = modes.score_input(valid, valid, grey[:1])
    assert score["coverage"] == 1.0 and score["precision"] == 1.0
    assert score["assigned"] == [1, 1, 1, 1]
    assert score["nearest_distance"] == pytest.approx(0.0, abs=1e-6)
    assert score["structure"] == pytest.approx(1.0, abs=1e-4)


def test_collapsed_samples_cover_one_mode(grey):
    valid = modes.modes_of(grey)
    samples = valid[2:3].expand(6, -1, -1, -1)
    score = modes.score_input(samples, valid, grey[:1])
    assert score["coverage"] == 0.25
    assert score["precision"] == 1.0
    assert score["assigned"] == [0, 0, 6, 0]
    assert score["modes_hit"] == [0, 0, 1, 0]


def test_a_blend_of_modes_is_assigned_but_not_precise(grey):
    """The mean of all tints (what a regression to the mean gives) is nearest some mode, but within the
    threshold of none: it counts for neither coverage nor precision."""
    valid = modes.modes_of(grey)
    blend = valid.mean(0, keepdim=True)
    score = modes.score_input(torch.cat([blend, valid[0:1]]), valid, grey[:1])
    assert score["precision"] == 0.5
    assert score["coverage"] == 0.25
    assert sum(score["assigned"]) == 2


def test_threshold_separates_modes(grey):
    valid = modes.modes_of(grey)
    tau = modes.threshold(valid)
    d = modes.rms(valid, valid)
    off_diagonal = d[~torch.eye(len(valid), dtype=torch.bool)]
    assert tau == pytest.approx(modes.THRESHOLD_FRACTION * float(off_diagonal.min()), rel=1e-5)
    assert 2 * tau < float(off_diagonal.min())  # a sample within tau of a mode is nearer it than any other


def test_slightly_off_samples_count_and_far_ones_do_not(grey):
    valid = modes.modes_of(grey)
    tau = modes.threshold(valid)
    near = (valid[1] + 0.5 * tau).clamp(0, 1)  # uniform shift: RMS distance about tau / 2
    far = (valid[3] + 3 * tau).clamp(0, 1)
    score = modes.score_input(torch.stack([near, far]), valid, grey[:1])
    assert score["modes_hit"] == [0, 1, 0, 0]
    assert score["precision"] == 0.5


def test_tint_correction_forgives_an_off_colour_but_not_a_lost_texture(grey):
    valid = modes.modes_of(grey)
    off_tint = modes.tint(grey, modes.PALETTE[0] * torch.tensor([0.7, 1.0, 2.0]))  # red, its tint well off
    flat = modes.tint(torch.full_like(grey, float(grey.mean())), modes.PALETTE[0])  # red, no texture
    score = modes.score_input(torch.stack([off_tint, flat]), valid, grey[:1])
    assert score["precision"] == 0
    assert score["tint_corrected_precision"] == 0.5
    assert float(modes.tint_corrected(off_tint[None], valid[:1])[0]) < 1e-5


def test_structure_falls_when_the_texture_is_lost(grey):
    valid = modes.modes_of(grey)
    flat = valid.mean((2, 3), keepdim=True).expand_as(valid) + 0.01 * torch.randn(valid.shape,
                                                                                   generator=torch.Generator().manual_seed(0))
    assert modes.structure(valid, grey[:1]).min() > 0.999
    assert modes.structure(flat, grey[:1]).abs().max() < 0.5


def test_ideal_coverage():
    assert modes.ideal_coverage(4, 1) == pytest.approx(0.25)
    assert modes.ideal_coverage(4, 12) == pytest.approx(1 - 0.75**12)


def test_ideal_hits_and_the_chance_a_perfect_sampler_falls_below_a_coverage():
    assert modes.ideal_hits(2, 1) == [0, 1, 0]
    assert modes.ideal_hits(2, 2) == pytest.approx([0, 0.5, 0.5])
    hits = modes.ideal_hits(4, 12)
    assert sum(hits) == pytest.approx(1)
    assert sum(j * p for j, p in enumerate(hits)) / 4 == pytest.approx(modes.ideal_coverage(4, 12))
    # One set of codes for all inputs: below 0.8 whenever a mode is missed, whatever the number of inputs.
    assert modes.ideal_below(4, 12, 16, 0.8, shared=True) == pytest.approx(1 - hits[4])
    # Independent inputs: two inputs with a mode missed each (3 + 3 of 8 hits = 0.75) fall below 0.8, one does not.
    assert modes.ideal_below(4, 12, 2, 0.8, shared=False) == pytest.approx(1 - hits[4] ** 2 - 2 * hits[4] * hits[3])
    # Against a simulation of the perfect sampler.
    g = torch.Generator().manual_seed(0)
    draws = torch.randint(0, 4, (20000, 2, 12), generator=g)
    covered = torch.stack([(draws == m).any(-1) for m in range(4)], -1).float().mean((-1, -2))
    assert float((covered < 0.8).float().mean()) == pytest.approx(modes.ideal_below(4, 12, 2, 0.8, False), abs=0.01)
    assert modes.ideal_below(4, 12, 16, 0.8, shared=False) < 1e-6


def test_every_held_out_input_draws_codes_of_its_own():
    seeds = {modes.sampling_seed(seed, i) for seed in range(6) for i in range(100)}
    assert len(seeds) == 600
    assert modes.shared_seed(1) == 1001  # the earlier reports' sampling seed, kept for their comparison


def test_training_pairs_show_one_valid_tint_each(tmp_path):
    targets, inputs = modes.write_training_pairs(tmp_path, 6, seed=3)
    from chimle.data import load_image

    for path in sorted(targets.iterdir()):
        grey = load_image(inputs / path.name)
        target = load_image(path)
        d = modes.rms(target[None], modes.modes_of(grey))[0]
        assert float(d.min()) < 0.01  # exactly one palette tint, up to 8-bit rounding
        assert float(d.sort().values[1]) > 0.1


def test_claim_verdicts_respect_the_seed_spread():
    import common

    def stats(values):
        return {"fid": common.spread(values)}

    values = {"good": [10.0, 11.0, 12.0], "bad": [20.0, 21.0, 22.0], "close": [10.5, 12.5, 9.0]}
    summary = {name: stats(v) for name, v in values.items()}
    records = [{"variant": name, "seed": seed, "fid": x} for name, v in values.items() for seed, x in enumerate(v)]
    from ablations import verdict

    assert "agrees" in verdict(summary, records, "good", "bad", "fid")
    assert "3 of 3 seeds" in verdict(summary, records, "good", "bad", "fid")
    assert "disagrees" in verdict(summary, records, "bad", "good", "fid")
    assert "inconclusive" in verdict(summary, records, "good", "close", "fid")
    assert "2 of 3 seeds" in verdict(summary, records, "good", "close", "fid")


def test_ablation_report_states_the_optimiser_its_runs_used():
    """The ablations inherit the `small` preset's decompression settings, so the report says what the runs trained
    with (a weight average since `small` took one up), and a report from before that was recorded keeps its text."""
    import common
    from ablations import SHARED, VARIANTS, optimiser

    t = common.config("decompression", [*SHARED, *VARIANTS["levels=4"]]).train
    assert t.ema > 0 and f"EMA {t.ema:g}" in optimiser({"optimiser": {"lr": t.lr, "ema": t.ema, "schedule": t.schedule}})
    assert optimiser({}) == "lr 0.002, constant"
    assert optimiser({"optimiser": {"lr": 0.004, "ema": 0.0, "schedule": "cosine"}}) == "lr 0.004, cosine"


def test_mode_report_of_some_methods_states_only_their_claims_and_the_extra_settings():
    """`benchmarks/modes.py --methods hierarchical -o ...` (a sweep of one method) writes a report without the
    comparisons it did not run, and names the settings it added."""
    def record(method, seed, coverage):
        per_input = [{"threshold": 0.07, "assigned": [3, 3, 3, 3]}]
        return {"seed": seed, "method": method, "coverage": coverage, "precision": 0.5, "nearest_distance": 0.1,
                "structure": 0.97, "seconds": 90.0, "per_input": per_input, "size": {"parameters": 1, "macs_per_forward": 1}}

    size = dict(modes.SIZES["default"], methods=["hierarchical"], overrides=["search.samples_per_level=[16,4,4]"])
    run = {"command": "modes.py", "wall_seconds": 1, "cpu_seconds": 1, "load_average_before": [0, 0, 0],
           "load_average_after": [0, 0, 0], "machine": {"cpus": 2, "omp_num_threads": "1"}}
    markdown, data = modes.report({"records": [record("hierarchical", s, c) for s, c in ((0, 1.0), (1, 0.75))]},
                                  size, "default", run)
    assert "| hierarchical | 0.875" in markdown
    assert "| 0.750 | - |" in markdown  # the lowest seed; no shared-codes coverage in a record made before it
    assert "[3, 3, 3, 3] (first input)" in markdown  # nor the shares of all samples
    assert "flat" not in markdown.split("## Reading")[0].split("| method |")[1]
    assert "The claims, as measured" not in markdown
    assert "search.samples_per_level=[16,4,4]" in markdown
    assert data["overrides"]["every method"] == ["search.samples_per_level=[16,4,4]"]
    full = modes.report({"records": [record(m, s, 0.5) for m in modes.METHODS for s in (0, 1)]},
                        modes.SIZES["default"], "default", run)[0]
    assert "hierarchical vs regression" in full and "Hierarchical vs flat" in full


def test_quality_benchmark_redoes_a_job_whose_result_was_written_for_another_spec(tmp_path):
    """A calibration left in the work folder by an earlier version of the benchmark (no "ratio") made --quick
    fail with a KeyError; such a result is now done again, and only a result written for the same spec counts."""
    import quality

    spec = {"kind": "calibrate", "task": "super-resolution", "config": "crop 64",
            "result": str(tmp_path / "calibration.json")}
    assert not quality.finished(spec)
    Path(spec["result"]).write_text('{"round_seconds": 91.3}')  # the earlier format: no spec, no ratio
    assert not quality.finished(spec)
    Path(spec["result"]).write_text("not json")
    assert not quality.finished(spec)
    Path(spec["result"]).write_text(json.dumps({"ratio": 0.35, "spec": {**spec, "config": "EMA 0.995"}}))
    assert not quality.finished(spec)
    Path(spec["result"]).write_text(json.dumps({"ratio": 0.35, "spec": json.loads(json.dumps(spec))}))
    assert quality.finished(spec)


@pytest.mark.parametrize("task", ["super-resolution", "colourization", "decompression"])
def test_every_quality_configuration_is_a_valid_config_of_every_task(task):
    """A configuration whose overrides name a setting that does not exist, or a value out of range, fails here
    rather than in the middle of a two-hour ladder."""
    import quality
    from chimle.config import ConfigError

    for name, overrides in quality.CONFIGS.items():
        if task == "colourization" and "model.predict_residual=true" in overrides:  # chroma is not its input
            with pytest.raises(ConfigError, match="predict_residual"):
                quality.job_config(task, name)
            continue
        assert quality.job_config(task, name).task == task, name


def test_quality_refuses_a_configuration_that_does_not_apply_to_the_task_before_any_work(tmp_path, capsys):
    import quality

    with pytest.raises(SystemExit) as stopped:
        quality.main(["--task", "colourization", "--configs", "small", "small, residual", "--work",
                      str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert "configuration 'small, residual' does not apply to colourization" in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_quality_reports_the_runs_it_was_asked_for_not_every_result_in_its_work_folder(tmp_path, monkeypatch):
    """A work folder kept results of a configuration run before a preset change; a later run of other
    configurations put them in its report under the name's new meaning."""
    import quality

    asked = [{"task": "super-resolution", "config": "small, residual", "seed": 0, "budget_minutes": 1.0}]
    stale = tmp_path / "work" / "super-resolution" / "small" / "budget-1" / "seed-0.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({**asked[0], "config": "small"}))
    reported = {}
    monkeypatch.setattr(quality, "run", lambda *args: asked)
    monkeypatch.setattr(quality, "summarise", lambda results: reported.setdefault("results", results))
    monkeypatch.setattr(quality, "markdown", lambda table, record: "")
    monkeypatch.setattr(quality, "plot", lambda results, path: None)
    quality.main(["--configs", "small, residual", "--seeds", "0", "--budget", "1", "--work", str(tmp_path / "work"),
                  "--out", str(tmp_path / "out")])
    assert reported["results"] == asked


def test_quality_learning_curve_points_are_evenly_spaced_rounds_ending_with_the_last(capsys):
    import quality

    assert quality.snapshot_steps(14, 60, 4) == [240, 420, 660, 840]
    assert quality.snapshot_steps(42, 60, 8) == [60 * r for r in (6, 11, 16, 21, 27, 32, 37, 42)]
    assert quality.snapshot_steps(3, 60, 8) == [60, 120, 180]  # no more points than rounds
    with pytest.raises(SystemExit):
        quality.main(["--snapshots", "0", "--configs", "small"])
    assert "--snapshots 0: give 1 or more" in capsys.readouterr().err


def test_quality_budget_pays_a_switching_configurations_last_rounds_at_their_own_cost():
    """A configuration whose last rounds use a dearer distance (train.final_rounds) gets fewer rounds than the
    budget holds at the reference's cost: those rounds at their calibrated cost, the rest at the others'."""
    import quality

    plain = {"ratio": 1.0, "same_cost_as": quality.REFERENCE}
    assert quality.rounds_within(22.0, plain, 0, "plain") == 22
    switching = {**plain, "final": {"ratio": 2.5, "times": {}}}
    assert quality.rounds_within(22.0, switching, 4, "switching") == 4 + 12  # 4 x 2.5 = 10 of the 22
    with pytest.raises(SystemExit, match="more than the budget's 22.0"):
        quality.rounds_within(22.0, switching, 9, "switching")
    config = quality.job_config("decompression", "EMA 0.995 + 126 photos + lr 0.004, VGG last 4")
    first, last = quality.one_distance(config), quality.one_distance(config, final=True)
    assert (first.train.perceptual, last.train.perceptual) == ("alex", "vgg")
    assert first.train.final_rounds == last.train.final_rounds == 0
    reference = quality.job_config("decompression", quality.REFERENCE)
    assert quality.cost_key(first) == quality.cost_key(reference) != quality.cost_key(last)


def test_quality_calibrates_a_bfloat16_step_apart_only_where_it_computes_in_bfloat16(monkeypatch):
    """train.precision=auto costs its own calibration where the CPU computes in bf16 natively, and is the float32
    configuration's cost (the same key) where it does not; the calibrated round runs the step as training does."""
    import quality
    from chimle import devices

    fp32 = quality.job_config("decompression", "EMA 0.995 + 126 photos + lr 0.004, VGG last 2, pools x2")
    bf16 = quality.job_config("decompression", "EMA 0.995 + 126 photos + lr 0.004, VGG last 2, pools x2, bf16 step")
    assert bf16.train.precision == "auto" and fp32.train.precision == "float32"
    monkeypatch.setattr(devices, "native_bf16", lambda device: True)
    assert quality.cost_key(bf16) != quality.cost_key(fp32)
    monkeypatch.setattr(devices, "native_bf16", lambda device: False)
    assert quality.cost_key(bf16) == quality.cost_key(fp32)


def test_quality_keeps_an_earlier_reports_results_and_names_the_runs_they_came_from():
    """--keep: a report's results beside this run's; a result of the same task, budget, configuration and seed is
    replaced by this run's, and the report names every run its rows came from."""
    import quality

    def result(config, seed, ratio, cpu_model=None):
        final = {"builtin": {"ratio_best": ratio, "baseline": 0.36}}
        return {"task": "decompression", "budget_minutes": 14.0, "config": config, "seed": seed, "rounds": 22,
                "train_cpu_seconds": 840.0, "overrides": [], "final": final, "curve": [],
                **({"cpu_model": cpu_model} if cpu_model else {})}

    def record(command, cpu_model):
        return {"command": command, "wall_seconds": 60.0, "cpu_seconds": 60.0, "load_average_before": [0, 0, 0],
                "load_average_after": [0, 0, 0], "machine": {"cpu_model": cpu_model, "cpus": 2, "omp_num_threads": "1"}}

    older = record("python benchmarks/quality.py --seeds 0", "Old CPU")
    earlier = {**record("python benchmarks/quality.py --seeds 0 1", "Xeon"), "earlier": [older],
               "results": [result("small", 0, 0.90), result("small", 1, 0.91)]}
    results, runs = quality.keep(earlier, [result("small", 1, 0.80, "EPYC"), result("+ EMA 0.995", 0, 0.85, "EPYC")])
    assert sorted((r["config"], r["seed"], r["final"]["builtin"]["ratio_best"]) for r in results) == [
        ("+ EMA 0.995", 0, 0.85), ("small", 0, 0.90), ("small", 1, 0.80)]
    assert [r["command"] for r in runs] == ["python benchmarks/quality.py --seeds 0 1",
                                            "python benchmarks/quality.py --seeds 0"]
    for r in results:
        r["final"]["builtin"].update(ratio_mean=None, diversity=None, kid=None, precision=None, recall=None,
                                     coverage=None, consistency=None)
    text = quality.markdown(quality.summarise(results), {**record("python benchmarks/quality.py --keep x", "EPYC"),
                                                         "earlier": runs})
    assert "- `python benchmarks/quality.py --seeds 0 1` on Xeon" in text
    assert "- `python benchmarks/quality.py --seeds 0` on Old CPU" in text
    assert "Rows that recorded their machine ran on: EPYC." in text


def test_quality_report_gives_each_configurations_learning_curve_as_means_over_seeds():
    import common
    import quality

    def result(seed, ratios):
        numbers = {m: 0.5 for m, _ in quality.COLUMNS} | {"ratio_best": ratios[-1], "baseline": 0.6}
        curve = [{"step": 60 * r, "cpu_seconds": 45.0 * r + seed, "scores": {"builtin": {"ratio_best": x}}}
                 for r, x in zip((6, 12), ratios)]
        return {"task": "super-resolution", "config": "small", "seed": seed, "budget_minutes": 9, "rounds": 12,
                "steps": 720, "train_cpu_seconds": 540.0, "overrides": [], "final": {"builtin": numbers},
                "curve": curve}

    table = quality.summarise([result(0, (0.93, 0.91)), result(1, (0.91, 0.89))])
    curve = table["super-resolution @ 9 CPU-min"]["small"]["curve"]
    assert [p["round"] for p in curve] == [6, 12]
    assert [p["ratio_best"] for p in curve] == pytest.approx([0.92, 0.90])
    assert [p["cpu_minutes"] for p in curve] == pytest.approx([(270 + 0.5) / 60, (540 + 0.5) / 60])
    text = quality.markdown(table, common.run_record(common.Stopwatch(), [0.0, 0.0, 0.0]))
    assert "- **small**: 6 (4.5) 0.920, 12 (9.0) 0.900" in text


def test_quality_jobs_stop_when_their_driver_stops(tmp_path, monkeypatch):
    """Stopping the benchmark (Ctrl-C, or a kill of its driver) used to leave its one-thread job processes
    training on, unseen; they now stop with it, and their results stay unwritten."""
    import subprocess

    import quality

    started, popen = [], subprocess.Popen

    def job(args, **kwargs):  # a stand-in for a training job: a process that would run for a minute
        started.append(popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[-1]

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(quality.subprocess, "Popen", job)
    monkeypatch.setattr(quality.time, "sleep", interrupt)
    specs = [{"kind": "train", "config": "small", "seed": seed, "result": str(tmp_path / f"seed-{seed}.json")}
             for seed in (0, 1, 2)]
    with pytest.raises(KeyboardInterrupt):
        quality.run_jobs(specs, 2)
    assert len(started) == 2 and all(p.poll() is not None for p in started)
    assert not any(Path(s["result"]).exists() for s in specs)


def test_mac_count_scales_with_pixels():
    import common
    from chimle.config import resolve

    cfg = resolve(task="decompression", preset="tiny").model
    small, large = common.macs(cfg, 16, per_level=True), common.macs(cfg, 32, per_level=True)
    assert len(small) == cfg.levels and all(v > 0 for v in small)
    # Convolutions dominate: four times the pixels, almost four times the work (linear layers do not grow).
    assert 3.9 < sum(large) / sum(small) <= 4.0


def test_quality_benchmark_refuses_too_few_photos_for_coverage_before_any_work(tmp_path, capsys):
    """Coverage needs k + 1 real images per held-out set; fewer once made every run fail after its training
    (`--quick` scored 4 photos)."""
    import quality

    assert not 0 < quality.QUICK["photos"] < quality.MIN_PHOTOS
    with pytest.raises(SystemExit) as stopped:
        quality.main(["--photos", "4", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert "--photos 4: give 0" in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", ["super-resolution", "layout"])
def test_quality_score_averages_tiles_and_gives_ratios_only_where_the_task_has_a_baseline(task, tmp_path):
    """One scoring for benchmarks/quality.py and scripts/train_builtin.py's records; layouts have no baseline."""
    import quality

    from chimle import tasks
    from chimle.checkpoint import save_model
    from chimle.generator import Generator
    from chimle.perceptual import LPIPS
    from conftest import randomize, tiny_config

    config = tiny_config(task)
    save_model(tmp_path / "model.safetensors", randomize(Generator(config.model), seed=1), config)
    g = torch.Generator().manual_seed(0)
    targets = [torch.rand(3, 32, 32, generator=g) for _ in range(2)]
    given = [tasks.get(task).input_for(t[None], config)[0] for t in targets] if task != "layout" else \
        [torch.nn.functional.one_hot(torch.randint(0, config.model.in_channels, (32, 32), generator=g),
                                     config.model.in_channels).permute(2, 0, 1).float() for _ in targets]
    sets = {"tiles": [(f"t{i}", x, y) for i, (x, y) in enumerate(zip(given, targets))]}
    scores = quality.score(tmp_path / "model.safetensors", sets, False, LPIPS("alex"))["tiles"]
    assert scores["tiles"] == 2 and 0 < scores["best"] <= scores["mean"]
    if task == "layout":
        assert scores["baseline"] is None and scores["ratio_best"] is None and scores["ratio_mean"] is None
    else:
        assert scores["ratio_best"] == pytest.approx(scores["best"] / scores["baseline"])
    # the sampling seed (benchmarks/score_models.py --seeds) decides the samples, and only it
    assert quality.score(tmp_path / "model.safetensors", sets, False, LPIPS("alex"), seed=0)["tiles"] == scores
    assert quality.score(tmp_path / "model.safetensors", sets, False, LPIPS("alex"), seed=1)["tiles"]["best"] != \
        scores["best"]


def test_speed_report_says_whether_the_compiled_search_pays():
    import speed

    report = json.loads((Path(speed.__file__).parent / "results" / "speed.json").read_text())
    ours = max((r for r in report["results"] if r.get("mode") == speed.OURS and r["task"] == "super-resolution"),
               key=lambda r: r["examples"])
    n = ours["examples"]
    compiled = {**ours, "mode": speed.COMPILED, "seconds_per_example": 0.8 * ours["seconds_per_example"],
                "compile_and_first_example_seconds": 0.8 * ours["seconds_per_example"] + 300.0}
    report["results"].append(compiled)
    text = speed.render(report)
    assert f"**The search through torch.compile** (`search.compile=true`; super-resolution, {n} examples)" in text
    assert f"(1.25x), the same codes for {n} of {n} examples" in text and "about 300 s more than searching" in text
    saved = 0.2 * ours["seconds_per_example"]
    assert f"it pays after {300 / saved:.0f} examples" in text
    assert "| search.compile pays over a 400-example round | 1.25x per example, 300 s to compile | yes |" in text

    compiled["seconds_per_example"] = 1.1 * ours["seconds_per_example"]
    assert "it does not pay: the compiled search is no faster" in speed.render(report)


def test_speed_times_each_search_without_the_profiler_and_profiles_a_second_run(monkeypatch):
    import speed

    calls = []

    def search(g, d, t, x, y, s, p, b):  # stands in for a search: records whether the profiler is on
        calls.append(torch._C._autograd._profiler_enabled())
        with torch.profiler.record_function("search.candidates"):
            torch.ones(64, 64) @ torch.ones(64, 64)
        return SearchResult(s.clone(), torch.zeros(len(s), len(p), dtype=torch.long), list(p), torch.zeros(len(s), len(p)))

    monkeypatch.setitem(speed.SEARCHES, speed.OURS, search)
    spec = {"task": "super-resolution", "quick": True, "mode": speed.OURS, "examples": 1, "pools": [4, 4, 2, 2]}
    result = speed.phase_search(spec, torch.device("cpu"))
    assert calls == [False] and "stages" not in result  # timed, not profiled
    result = speed.phase_search({**spec, "profile": True}, torch.device("cpu"))
    assert calls == [False, False, True] and "candidates" in result["stages"]
    assert result["profiled_seconds"] > 0 and result["seconds"] > 0


def test_speed_keeps_an_earlier_reports_other_phases_only_from_the_same_machine(tmp_path):
    import speed

    earlier = json.loads((Path(speed.__file__).parent / "results" / "speed.json").read_text())
    earlier["results"] = [{k: v for k, v in r.items() if k != "kept"} for r in earlier["results"]]  # all its own
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(earlier))
    report = {**{k: earlier[k] for k in ("machine", "device", "quick")}, "command": "python speed.py", "results": []}
    kept = speed.kept_results(path, report, {"search", "roofline"})
    assert kept and {r["phase"] for r in kept} == {r["phase"] for r in earlier["results"]} - {"search", "roofline"}
    assert all(r["kept"]["command"] == earlier["command"] for r in kept)
    fresh = [r for r in earlier["results"] if r["phase"] in ("search", "roofline")]
    text = speed.render({**earlier, "results": fresh + kept})
    assert "were not measured by this command: their numbers are kept (`--keep`)" in text
    assert f"`{earlier['command']}`" in text and "## Training step" in text
    # Kept again by a later run that measures the sampling too: each kept number still names the run that measured it.
    path.write_text(json.dumps({**earlier, "command": "python speed.py --keep speed.json", "results": fresh + kept}))
    again = speed.kept_results(path, report, {"sample"})
    assert {r["phase"]: r["kept"]["command"] for r in again}["train"] == earlier["command"]
    assert {r["phase"]: r["kept"]["command"] for r in again}["search"] == "python speed.py --keep speed.json"

    other = {**report, "machine": {**earlier["machine"], "cpu_flags": "avx avx2"}}
    with pytest.raises(SystemExit, match="another machine"):
        speed.kept_results(path, other, {"search"})


def test_speed_run_with_keep_measures_its_phases_and_reports_the_kept_ones(tmp_path):
    """speed.py --keep end to end (it failed once a run had measured everything: a name clash in main)."""
    import common
    import speed

    committed = json.loads((Path(speed.__file__).parent / "results" / "speed.json").read_text())
    sample = next(r for r in committed["results"] if r["phase"] == "sample")
    earlier = {"command": "python speed.py --quick", "machine": common.machine(), "uptime_before": "12:00",
               "device": "cpu", "quick": True, "results": [sample]}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    skip = ",".join(p for p in speed.PHASES if p != "roofline")
    result = subprocess.run([sys.executable, speed.__file__, "--quick", "--tasks", "super-resolution", "--skip", skip,
                             "--keep", str(tmp_path / "earlier.json"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert [r["phase"] for r in report["results"]] == ["roofline", "sample"] and report["results"][1]["kept"]
    assert 0 < report["total_minutes"] < 10  # this run's measurement alone
    assert "Phases `sample` were not measured by this command" in (tmp_path / "out" / "speed.md").read_text()


def test_speed_report_holds_the_bf16_search_to_the_target_where_the_device_computes_bf16():
    import speed

    report = json.loads((Path(speed.__file__).parent / "results" / "speed.json").read_text())
    report["results"] = [r for r in report["results"] if r.get("mode") != speed.BF16]
    roof = next(r for r in report["results"] if r.get("phase") == "roofline")
    roof["native_bf16"] = False
    ours = next(r for r in report["results"] if r.get("mode") == speed.OURS and r["examples"] == 1)
    naive = next(r for r in report["results"] if r.get("mode") == speed.NAIVE and r["examples"] == 1)
    roofline_target = "| search without native bf16: within 15% of the float32 roofline |"
    text = speed.render(report)  # no bf16 search: held to the roofline, not to 3x the naive mode
    assert roofline_target in text and ">= 3x faster than naive" not in text

    roof["native_bf16"] = True
    bf16 = {**ours, "mode": speed.BF16, "seconds_per_example": naive["seconds_per_example"] / 3.2}
    report["results"].append(bf16)
    text = speed.render(report)
    assert roofline_target not in text
    assert "| search super-resolution, 1 example(s), with native bf16, in bf16: >= 3x faster than naive | 3.20x | yes |" in text
    assert "| super-resolution | bfloat16, 2 rescored | 1 |" in text and "| super-resolution | float32 | 1 |" in text
    assert speed.BF16 in text  # a rung of the ladder of levers


def test_speed_report_reads_the_search_against_the_per_shape_roofline():
    import speed

    report = json.loads((Path(speed.__file__).parent / "results" / "speed.json").read_text())
    roof = next(r for r in report["results"] if r.get("phase") == "roofline")
    ours = next(r for r in report["results"] if r.get("mode") == speed.OURS and r["examples"] == 1)
    # Two shapes at level 0 and one at level 1: 30 s alone in all, against the search's measured time.
    roof.update(native_bf16=False, per_shape=[
        {"level": 0, "shape": [8, 16, 8, 8], "batch": 64, "gmac_per_example": 100.0, "gmac_per_second": 10.0},
        {"level": 0, "shape": [16, 16, 8, 8], "batch": 64, "gmac_per_example": 200.0, "gmac_per_second": 20.0},
        {"level": 1, "shape": [16, 8, 16, 16], "batch": 32, "gmac_per_example": 500.0, "gmac_per_second": 50.0}])
    text = speed.render(report)
    assert "| 0 | 2 | 64 | 300 | 20.0 | 15 | 10-20 |" in text and "| 1 | 1 | 32 | 500 | 10.0 | 50 | 50-50 |" in text
    share = 30.0 / ours["seconds_per_example"]
    assert f"{share:.0%} of the per-shape roofline" in text
    assert f"| (the same against the per-shape roofline, for reference) | {share:.0%} of 27 GMAC/s | **no** |" in text


def test_speed_bf16_check_runs_a_trained_model_with_its_own_distance():
    import speed

    spec = {"model": "builtin:super-resolution", "quick": True, "examples": 2, "pools": [3, 3, 2, 2],
            "rescores": [0, 2]}
    result = speed.phase_bf16(spec, torch.device("cpu"))
    assert result["task"] == "super-resolution" and not result["narrow_model"]
    trained = read_config(builtin.locate("builtin:super-resolution")).train  # the search's distance is the model's own
    assert result["distance"] == f"LPIPS-{dict(vgg='VGG', alex='AlexNet')[trained.perceptual]} + {trained.pixel_weight:g} x L1"
    assert result["parameters"] < 10e6  # the model itself, not the paper-width one the other checks build
    assert set(result["agreement"]) == {"bfloat16", "bfloat16, 2 rescored"}
    for agreement in result["agreement"].values():
        assert len(agreement["per_level_agreement"]) == 4 and 0 <= agreement["fraction_identical"] <= 1
    result["phase"] = "bf16"
    text = speed.render({**json.loads((Path(speed.__file__).parent / "results" / "speed.json").read_text()),
                         "results": [result]})
    assert "**`builtin:super-resolution`, trained" in text and f"distance {result['distance']};" in text


def test_gpu_report_keeps_what_each_phase_measured_and_names_a_failed_phase():
    import gpu

    report = {"date": "2026-01-01", "command": "python benchmarks/gpu.py", "device_name": "GPU", "torch": "2",
              "model": {"parameters": 210_622_936}, "quick": False, "crop": 256, "peak_tflops": 790.0, "minutes": 5.0,
              "failed": {"train": "Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory"},
              "tests": {"returncode": 1, "seconds": 90.0, "measured": {"sample": {"max_pixel_difference": 2e-6}},
                        "tests": [{"name": "test_sampling", "seconds": 3.0, "outcome": "passed", "message": ""},
                                  {"name": "test_resume", "seconds": 9.0, "outcome": "failure", "message": "bound"}]},
              "peak": {"n": 8192, "tflops": 780.0},
              "search": {"examples": 16, "pools": [200, 200, 20, 10], "max_batch": 400, "generator_gmac_per_example": 1,
                         "lpips_gmac_per_example": 1, "runs": {
                             name: {"seconds": 2.0, "examples_per_second": 8.0, "tflops": tflops, "utilisation": tflops / 790,
                                    "utilisation_of_measured_peak": tflops / 780, "winners_equal_float32": [1.0, 0.9]}
                             for name, tflops in zip(gpu.SEARCH_ROWS, (395.0, 60.0, 420.0))}},
              "sample": {"images": 512, "batch": 64, "output_px": 256, "images_per_second": {"as shipped": 80.0, "bf16": 120.0}}}
    text = gpu.render(report)
    assert "**Phase `train` failed**: `torch.OutOfMemoryError: CUDA out of memory`" in text
    assert "1 passed, 1 failed" in text and "| test_resume | failure: bound |" in text
    assert '"max_pixel_difference": 2e-06' in text
    assert "| search utilisation (bf16) >= 40% | 50.0% | yes |" in text  # the first row: chimle's default
    assert "| sampling at 256 px >= 100 images/s | 120.0 | yes |" in text
    assert "| `pytest -m cuda` passes | exit status 1 | **no** |" in text
    assert "## Training step" not in text  # the failed phase has no table


def test_gpu_script_rehearses_on_the_cpu(tmp_path):
    """benchmarks/gpu.py at toy sizes on the CPU, without its checks (CI rehearses those: test_cuda.py) and the
    compile phase (minutes)."""
    import subprocess

    result = subprocess.run([sys.executable, str(GPU_SCRIPT),
                             "--device", "cpu", "--quick", "--skip", "tests,compile", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert not report["failed"], report["failed"]
    assert {"peak", "search", "sample", "train"} <= report.keys()


def test_model_scores_print_a_dash_for_a_task_without_a_baseline_and_a_spread_over_seeds():
    import score_models

    assert score_models.ratio(None) == "-" and score_models.spread([None, None]) == "-"
    assert score_models.ratio(0.81234) == "0.812" and score_models.spread([0.80, 0.81]) == "0.8050 ± 0.0071"


def test_mode_benchmark_refuses_a_work_folder_holding_a_run_with_other_settings(tmp_path):
    """Re-scoring reuses finished runs in --work, but only a run of exactly these settings and pairs: another
    run's model would be scored under this report's name. Where the pairs lie does not matter."""
    import common

    def config(*extra):
        return common.config("paired", [*modes.MODEL, *modes.SCHEDULE, *modes.METHODS["hierarchical"], *extra])

    (tmp_path / "config.yaml").write_text(config("train.lr=0.001", "data.path=elsewhere").to_yaml())
    with pytest.raises(SystemExit, match=r"train.lr: 0.001 there, 0.002 here") as refused:
        modes.trained(config(f"data.path={tmp_path}"), tmp_path, 96)
    assert "data.path" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # nothing trained, nothing written

    (tmp_path / "config.yaml").write_text(config("data.path=elsewhere").to_yaml())
    (tmp_path / modes.RUN_FILE).write_text('{"train_images": 384, "seconds": 100.0, "cpu_seconds": 99.0}')
    with pytest.raises(SystemExit, match=r"training pairs: 384 there, 96 here"):
        modes.trained(config(f"data.path={tmp_path}"), tmp_path, 96)
    # A finished run of these settings: its recorded time, no training (there are no data to train on here).
    assert modes.trained(config(f"data.path={tmp_path}"), tmp_path, 384) == {"seconds": 100.0, "cpu_seconds": 99.0}


def test_training_pairs_left_by_a_larger_set_are_removed(tmp_path):
    modes.write_training_pairs(tmp_path, 5, seed=0)
    targets, inputs = modes.write_training_pairs(tmp_path, 3, seed=0)
    assert sorted(p.name for p in targets.iterdir()) == sorted(p.name for p in inputs.iterdir()) == \
        ["0000.png", "0001.png", "0002.png"]


def test_quality_report_compares_a_task_without_the_ladder_reference_with_the_preset():
    """Colourization and decompression ran `small` at the demo's budget, not "small (before)": the report compares
    their other configurations with `small` rather than leaving the comparison empty."""
    import common
    import quality

    def result(task, config, seed, ratio):
        numbers = {m: 0.5 for m, _ in quality.COLUMNS} | {"ratio_best": ratio, "baseline": 0.4}
        return {"task": task, "config": config, "seed": seed, "budget_minutes": 14, "rounds": 21,
                "train_cpu_seconds": 840.0, "overrides": quality.CONFIGS[config], "final": {"builtin": numbers}}

    results = [result("colourization", "small", s, r) for s, r in enumerate((0.90, 0.91, 0.92))]
    results += [result("colourization", "+ 126 photos", s, r) for s, r in enumerate((0.80, 0.81, 0.82))]
    results += [result("super-resolution", "small (before)", s, 1.0) for s in range(3)]
    results += [result("super-resolution", "small", s, 1.0 + s / 100) for s in range(3)]
    # A group that ran neither reference (a follow-up on another machine) compares with its first row.
    best, vgg = "EMA 0.995 + 126 photos + lr 0.004", "EMA 0.995 + 126 photos + lr 0.004, VGG last 4"
    results += [result("decompression", c, s, r + s / 100) for c, r in ((vgg, 0.80), (best, 0.85)) for s in range(3)]
    text = quality.markdown(quality.summarise(results), common.run_record(common.Stopwatch(), [0.0, 0.0, 0.0]))
    colour, sr = text.split("## colourization")[1].split("## super-resolution")
    jpeg = text.split("## decompression")[1].split("\n## ")[0]
    assert f"| best-of-8 vs {best} |" in jpeg and "-0.050, better |" in jpeg and " vs None" not in text
    assert "| best-of-8 vs small |" in colour and "| + 126 photos | 3 | 21 |" in colour
    assert colour.index("| small | 3 |") < colour.index("| + 126 photos | 3 |")  # the reference's row first
    assert "-0.100, better |" in colour
    assert "**small**: the preset as it stands, no overrides" in colour
    assert "| best-of-8 vs small (before) |" in sr and "+0.010, within the seed spread |" in sr


def test_quality_benchmark_recognises_finished_runs_whatever_the_form_of_the_work_path(tmp_path, monkeypatch):
    """A benchmark run with `--work runs/quality` after one with the absolute path trained every run again (the
    specs named their folders differently, so no result counted as finished)."""
    import quality

    calibration = tmp_path / "work" / "decompression" / quality.slug(quality.REFERENCE) / "calibration.json"
    calibration.parent.mkdir(parents=True)
    calibration.write_text(json.dumps({"round_seconds": 30.0, "ratio": 1.0}))
    started = []
    monkeypatch.setattr(quality, "run_jobs", lambda specs, jobs: started.append(specs))
    monkeypatch.chdir(tmp_path)
    for work in (Path("work"), tmp_path / "work"):
        quality.run("decompression", 1.0, [quality.REFERENCE], [0], 1, work, None)
    relative, absolute = started[2][0], started[5][0]
    assert relative == absolute and Path(relative["out"]).is_absolute()


def test_a_benchmarks_cpu_time_includes_the_jobs_it_ran_in_child_processes():
    """quality.py trains in one-thread child processes: its report gave the run's CPU time as 0.0 minutes."""
    import common

    clock = common.Stopwatch()
    busy = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)
    assert clock.cpu_seconds >= 0.4


def test_ablations_refuse_rounds_with_rewrite(tmp_path):
    """--rewrite redraws a saved report with the rounds it recorded: a --rounds beside it would be silently
    ignored, so the two together are refused with a message that says why."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ablations.py"
    result = subprocess.run([sys.executable, str(script), "--rewrite", str(tmp_path / "ablations.json"), "--rounds",
                             "18", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--rounds trains longer and --rewrite trains nothing" in result.stderr
    assert not list(tmp_path.iterdir())


def test_speed_times_the_training_steps_own_forward_in_each_precision(monkeypatch):
    import speed

    import chimle.train

    monkeypatch.setattr(speed, "OVERRIDES", ["model.channels=[8,8,8,8]", "model.growth=[4,4,4,4]", "model.blocks=1",
                                             "data.crop=32"])
    precisions = []
    step_losses = chimle.train.step_losses

    def recording(config, *args, **kwargs):
        precisions.append(config.train.precision)
        return step_losses(config, *args, **kwargs)

    monkeypatch.setattr(speed, "step_losses", recording)
    result = speed.phase_train_bf16({"quick": True, "warmup": 0, "steps": 1}, torch.device("cpu"))
    assert precisions == ["float32", "bfloat16", "float32", "bfloat16"]  # the effect on the loss, then the timings
    effect = result["effect"]
    assert effect["loss_bf16"] != effect["loss_fp32"] and effect["max_relative_loss_difference"] < 0.02
    assert effect["gradient_cosine"] > 0.95
    precisions.clear()
    step = speed.phase_train({"quick": True, "variant": speed.TRAIN_AS_IT_IS, "warmup": 0, "steps": 1},
                             torch.device("cpu"))
    assert precisions == ["float32"] and step["seconds_per_step"] > 0


def test_modes_and_ablations_train_in_float32_as_their_committed_reports_did():
    """`small` trains with train.precision=auto (bf16 where native); the two benchmarks pin the float32 step their
    reports were measured with, so that rerunning them reproduces those reports on any machine."""
    import ablations
    import common
    import modes

    hierarchical = [*modes.MODEL, *modes.SCHEDULE, *modes.METHODS["hierarchical"]]
    assert common.config("paired", hierarchical).train.precision == "float32"
    for variant in ablations.VARIANTS.values():
        assert common.config("decompression", [*ablations.SHARED, *variant]).train.precision == "float32"


def test_a_rounds_time_is_its_search_and_its_steps_at_the_least_step_after_the_warm_up(monkeypatch):
    """One estimate of a round's time for quality.py's budgets and train_builtin.py's --minutes (once two: a mean
    of four steps with no warm-up there, the least after a warm-up here)."""
    import quality
    from conftest import tiny_config

    ticks = iter([0.0, 2.0,  # the search: 2 s
                  10.0, 19.0,  # the warm-up step: 9 s, not counted
                  20.0, 21.5, 30.0, 31.0, 40.0, 41.2, 50.0, 51.1])  # then 1.5, 1.0, 1.2, 1.1 s
    monkeypatch.setattr(quality.Clock, "now", lambda self: next(ticks))
    config = tiny_config("super-resolution", "train.steps_per_round=10")
    assert quality.round_seconds(config) == pytest.approx(2.0 + 10 * 1.0)
    assert next(ticks, None) is None


def test_speed_times_small_steps_in_both_layouts_alternately():
    """The layout phase times `small`'s step with the generator in each layout (steps interleaved) from the same
    initial weights, and the report gives each task's speed-up."""
    import speed

    spec = {"task": "decompression", "precision": "float32", "warmup": 0, "steps": 2}
    result = speed.phase_layout(spec, torch.device("cpu"))
    assert set(result["times"]) == {"default", "channels-last"}
    assert all(len(t) == 2 and min(t) > 0 for t in result["times"].values())
    assert result["crop"] == 64 and result["batch"] == 8 and result["step_dtype"] == "float32"
    earlier = json.loads((Path(speed.__file__).parent / "results" / "speed.json").read_text())
    text = speed.render({**earlier, "results": [{"phase": "layout", **spec, **result}]})
    default, last = result["seconds_per_step"]["default"], result["seconds_per_step"]["channels-last"]
    assert f"| decompression | 64 | float32 | {default:.3f} | {last:.3f} | {default / last:.2f}x |" in text
