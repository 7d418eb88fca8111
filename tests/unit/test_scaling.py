"""IsoFLOP fits (Chinchilla approach 2) on synthetic sweeps drawn from a known law, and their outputs."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from llmtrain.measure.planning import CHINCHILLA, ScalingLaw
from llmtrain.measure.scaling import (
    RunPoint,
    ScalingError,
    fit_scaling,
    format_table,
    load_runs,
    plot_isoflops,
    plot_optimal,
)
from tests.conftest import ROOT

BUDGETS = [1e18, 1e19, 1e20, 1e21]


def synthetic_sweep(law: ScalingLaw, budgets=BUDGETS, sizes: int = 9, noise: float = 0.005, seed: int = 0):
    """Runs at each budget over sizes 1/4x..4x the law's optimum, D = C/6N, loss from the law plus noise."""
    rng = np.random.default_rng(seed)
    points = []
    for budget in budgets:
        n_opt, _ = law.optimal(budget)
        for factor in np.geomspace(0.25, 4, sizes):
            n = n_opt * factor
            d = budget / (6 * n)
            points.append(
                RunPoint(budget, n, d, law.loss(n, d) + rng.normal(0, noise), name=f"{budget:.0e}-{n:.0f}")
            )
    return points


@pytest.mark.parametrize("law", [CHINCHILLA, ScalingLaw(alpha=0.5, beta=0.25)], ids=["chinchilla", "skewed"])
def test_fit_recovers_the_exponents_of_the_law(law):
    fit = fit_scaling(synthetic_sweep(law))
    total = law.alpha + law.beta
    assert fit.n_opt.exponent == pytest.approx(law.beta / total, abs=0.02)  # a = β/(α+β)
    assert fit.d_opt.exponent == pytest.approx(law.alpha / total, abs=0.02)  # b = α/(α+β)
    for m in fit.minima:
        n_opt, d_opt = law.optimal(m.budget)
        assert m.inside
        assert m.n_opt == pytest.approx(n_opt, rel=0.1) and m.d_opt == pytest.approx(d_opt, rel=0.1)
        assert m.loss_min == pytest.approx(law.loss(n_opt, d_opt), abs=0.01)


def test_a_plus_b_is_one_when_every_run_spends_its_budget():
    fit = fit_scaling(synthetic_sweep(CHINCHILLA, noise=0.0))
    assert fit.n_opt.exponent + fit.d_opt.exponent == pytest.approx(1.0, abs=1e-6)


def test_bad_input_gets_a_clear_error():
    points = synthetic_sweep(CHINCHILLA)
    with pytest.raises(ScalingError, match="no finished runs"):
        fit_scaling([])
    with pytest.raises(ScalingError, match="at least 2 budgets"):
        fit_scaling([p for p in points if p.budget == BUDGETS[0]])
    zero = RunPoint(0.0, 1e6, 1e9, 3.0, name="broke")
    with pytest.raises(ScalingError, match="broke: the budget must be a positive"):
        fit_scaling([*points, zero])
    two_sizes = [p for p in points if p.budget != BUDGETS[0]] + [p for p in points if p.budget == BUDGETS[0]][
        :2
    ]
    with pytest.raises(ScalingError, match="1e\\+18 has 2 distinct model size"):
        fit_scaling(two_sizes)
    concave = [RunPoint(p.budget, p.n_params, p.n_tokens, -p.loss) for p in points]
    with pytest.raises(ScalingError, match="no minimum"):
        fit_scaling(concave)


def test_plots_and_table_are_written(tmp_path):
    points = synthetic_sweep(CHINCHILLA, budgets=BUDGETS[:3], sizes=5)
    fit = fit_scaling(points)
    for path in (plot_isoflops(points, fit, tmp_path / "iso.png"), plot_optimal(fit, tmp_path / "opt.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    table = format_table(points, fit)
    assert table.count("\n| 1e+19 |") == 5 + 1 and "N_opt ∝ C^" in table


def write_run(run_dir, budget, d_model, loss, steps=10, family="decoder"):
    """A run directory as the trainer leaves it: config.json, result.json, metrics.jsonl."""
    run_dir.mkdir(parents=True)
    config = {
        "model": {"family": family, "d_model": d_model, "n_layers": 2, "n_heads": 2, "vocab_size": 0},
        "data": {"seq_len": 32, "tokenizer": {"vocab_size": 256}},
        "trainer": {"max_flops": budget, "micro_batch_size": 4},
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "result.json").write_text(json.dumps({"val_loss": loss, "val_bpb": loss / 2, "steps": steps}))
    records = [{"step": s, "loss": loss + 1, "tokens": s * 128} for s in range(5, steps + 1, 5)]
    records.append({"step": steps, "val_loss": loss, "val_bpb": loss / 2})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_runs_are_read_from_their_directories(tmp_path):
    write_run(tmp_path / "a", 1e9, 32, 3.0, steps=10)
    (tmp_path / "unfinished").mkdir()
    points, skipped = load_runs([tmp_path / "a", tmp_path / "unfinished"])
    assert len(points) == 1 and "unfinished is not a finished run" in skipped[0]
    (point,) = points
    assert point.budget == 1e9 and point.loss == 3.0 and point.name == "a"
    assert point.n_tokens == 10 * 128  # the tokens the trainer logged
    from llmtrain.config import to_dataclass
    from llmtrain.measure.shapes import model_config_for, parameter_count

    cfg = to_dataclass(json.loads((tmp_path / "a" / "config.json").read_text()))
    assert (
        point.n_params == parameter_count(model_config_for(cfg)) and model_config_for(cfg).vocab_size == 256
    )


def test_span_corruption_runs_count_corpus_tokens_as_d(tmp_path):
    """The trainer logs input tokens (512 of a 568-token raw window at the T5 defaults); D is the corpus tokens
    the run read, with or without the metrics log."""
    from llmtrain.config import to_dataclass
    from llmtrain.measure.shapes import lengths_for

    write_run(tmp_path / "t5", 1e9, 32, 3.0, steps=10, family="encoder_decoder")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    config["objective"] = {"name": "span_corruption"}
    (tmp_path / "t5" / "config.json").write_text(json.dumps(config))
    lengths = lengths_for(to_dataclass(config))
    assert lengths.corpus > lengths.inputs == 32
    logged = 10 * 4 * lengths.inputs  # steps x micro-batch x input tokens, as the trainer logs
    metrics = tmp_path / "t5" / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 10, "loss": 4.0, "tokens": logged}) + "\n")
    (point,), _ = load_runs([tmp_path / "t5"])
    assert point.n_tokens == 10 * 4 * lengths.corpus
    metrics.unlink()  # logger.jsonl=false: result.json's count over all ranks (2 here), the same D per token
    result = json.loads((tmp_path / "t5" / "result.json").read_text())
    (tmp_path / "t5" / "result.json").write_text(json.dumps({**result, "tokens": 2 * logged}))
    (point,), _ = load_runs([tmp_path / "t5"])
    assert point.n_tokens == 2 * 10 * 4 * lengths.corpus
    (tmp_path / "t5" / "result.json").write_text(json.dumps(result))  # neither: no guess from the config
    assert load_runs([tmp_path / "t5"])[0] == [] and "no tokens" in load_runs([tmp_path / "t5"])[1][0]
    # plot.py --x flops: the logged (input) tokens times FLOPs per input token = the steps' training FLOPs
    from llmtrain.measure.flops import forward_flops
    from llmtrain.measure.shapes import model_config_for

    spec = importlib.util.spec_from_file_location("plot", ROOT / "scripts" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    training = forward_flops(model_config_for(to_dataclass(config)), lengths).training
    assert plot.flops_per_token(tmp_path / "t5") * logged == pytest.approx(10 * 4 * training, rel=1e-12)


def run_script(name, *args, capsys=None):
    """A script's main() in this process (no torch import per call): (exit code, stderr)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_fit_script_errors_name_the_problem(tmp_path, capsys):
    code, err = run_script("fit_scaling.py", tmp_path / "nothing-*", "--out", tmp_path / "out", capsys=capsys)
    assert code == 2 and "no run directories match" in err
    for i, d_model in enumerate((32, 48, 64)):
        write_run(tmp_path / f"one-{d_model}", 1e9, d_model, 3.0 + 0.1 * (i - 1) ** 2)
    code, err = run_script("fit_scaling.py", tmp_path / "one-*", "--out", tmp_path / "out", capsys=capsys)
    assert code == 2 and "at least 2 budgets" in err
    write_run(tmp_path / "zero", 0, 32, 3.0)
    code, err = run_script("fit_scaling.py", tmp_path / "zero", "--strict", capsys=capsys)
    assert code == 2 and "no positive compute budget" in err


def test_plot_script_draws_curves(tmp_path, capsys):
    write_run(tmp_path / "a", 1e9, 32, 3.0, steps=20)
    write_run(tmp_path / "b", 1e9, 48, 2.8, steps=20)
    for x in ("step", "tokens", "flops"):
        out = tmp_path / f"curves-{x}.png"
        code, err = run_script(
            "plot.py", tmp_path / "a", tmp_path / "b", "--x", x, "--out", out, capsys=capsys
        )
        assert code == 0, err
        assert out.stat().st_size > 5000
    code, err = run_script("plot.py", tmp_path / "missing", "--out", tmp_path / "x.png", capsys=capsys)
    assert code == 2 and "no run directories match" in err


def test_a_window_around_the_best_run_fits_an_asymmetric_valley():
    """Far from the optimum the valley is no parabola in ln N; fitting near the best run still finds it."""
    wide = synthetic_sweep(CHINCHILLA, sizes=13, noise=0.0)  # 1/4x..4x: the grid is every 2^(1/3)
    wide += [
        RunPoint(
            p.budget, p.n_params * 64, p.n_tokens / 64, CHINCHILLA.loss(p.n_params * 64, p.n_tokens / 64)
        )
        for p in wide
        if p.n_params > CHINCHILLA.optimal(p.budget)[0] * 3.9
    ]  # one far, steep size
    local = fit_scaling(wide, neighbors=3)
    for m in local.minima:
        assert m.n_points == 7 and m.n_opt == pytest.approx(CHINCHILLA.optimal(m.budget)[0], rel=0.05)
        assert m.n_max < CHINCHILLA.optimal(m.budget)[0] * 2
    with pytest.raises(ScalingError, match="neighbors=0 must be >= 1"):
        fit_scaling(wide, neighbors=0)


def test_plot_writes_where_it_says(tmp_path, capsys):
    """--out without a suffix is written as .png and reported so; a folder that does not exist is refused
    before any work (nothing created)."""
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("plot", ROOT / "scripts" / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    write_run(tmp_path / "a", 1e9, 32, 3.0, steps=10)
    assert plot.main([str(tmp_path / "a"), "--out", str(tmp_path / "curves")]) == 0
    assert (
        tmp_path / "curves.png"
    ).is_file() and f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        plot.main([str(tmp_path / "a"), "--out", str(tmp_path / "missing" / "x.png")])
    assert stop.value.code == 2 and not (tmp_path / "missing").exists()


def test_a_run_on_a_given_tokenizer_is_counted_with_that_tokenizer(tiny_config, tmp_path):
    """A run on data.tokenizer.path keeps model.vocab_size 0 in config.json; the trainer sizes the model by
    the tokenizer. The fit, the plot's FLOPs and the planning scripts read the tokenizer's size too (they used
    data.tokenizer.vocab_size, the size of a BPE the run would train: N was 4-6x too large in the review)."""
    from llmtrain.config import to_dataclass
    from llmtrain.measure.scaling import point_from_run, run_model
    from llmtrain.measure.shapes import model_config_for, parameter_count
    from llmtrain.models import count_parameters
    from llmtrain.training.trainer import Trainer

    first = Trainer(tiny_config("decoder", "trainer.max_steps=1", "trainer.sample_tokens=0", "run_name=bpe"))
    first.fit()
    tokenizer = first.run_dir / "tokenizer.json"
    given = tiny_config(
        "decoder",
        f"data.tokenizer.path={tokenizer}",
        "data.tokenizer.vocab_size=4096",
        "trainer.max_flops=2e8",
        "trainer.sample_tokens=0",
        "run_name=given",
    )
    assert given.model.vocab_size == 0 and model_config_for(given).vocab_size == first.cfg.model.vocab_size
    trainer = Trainer(given)
    trainer.fit()
    built = count_parameters(trainer.model)
    # scripts/train.py hands the trainer Hydra's config, written before the vocabulary is fitted: 0 stays
    config = trainer.run_dir / "config.json"
    written = json.loads(config.read_text())
    written["model"]["vocab_size"] = 0
    config.write_text(json.dumps(written))
    assert parameter_count(model_config_for(given)) == built
    assert point_from_run(trainer.run_dir).n_params == built
    result = trainer.run_dir / "result.json"
    result.write_text(
        json.dumps({k: v for k, v in json.loads(result.read_text()).items() if k != "vocab_size"})
    )
    assert point_from_run(trainer.run_dir).n_params == built  # an older run: its copy of the tokenizer
    cfg = to_dataclass(json.loads((trainer.run_dir / "config.json").read_text()))
    assert cfg.model.vocab_size == 0 and parameter_count(run_model(trainer.run_dir, cfg)) == built
    # model.init_from's tokenizer.json is the one the trainer reads with, when no data.tokenizer.path is set
    from llmtrain.inference.export import export_hf

    folder = export_hf(trainer.model.state_dict(), trainer.cfg.model, tmp_path / "hf", tokenizer)
    initialised = tiny_config(
        "decoder", "data.tokenizer.path=null", "data.tokenizer.vocab_size=4096", f"model.init_from={folder}"
    )
    assert model_config_for(initialised).vocab_size == first.cfg.model.vocab_size
