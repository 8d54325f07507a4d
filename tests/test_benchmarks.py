"""Smoke tests: the benchmarks run the library's own code (tiny shapes)."""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_step_report(tmp_path, phases):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--batch=2",
           "--length=4", "--features=8", "--embed_features=8", "--candidates=2",
           "--feature_dim=8", "--steps=1", "--warmup=0", "--epoch_steps=1", "--epochs=1",
           f"--phases={','.join(phases)}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["train_step_impl"].startswith("surgfusion_jax.training.train")
    assert report["matmul_ceiling_gflops"] > 0
    assert sorted(report["phases"]) == sorted(phases)
    for phase in phases:
        step, epoch = report["phases"][phase]["step"], report["phases"][phase]["epoch"]
        assert step["median_ms"] > 0 and step["flops_per_step"] > 0
        assert 0 < step["fraction_of_matmul_ceiling"]
        assert step["products"] > 0 and step["products_alone_ms"] > 0
        assert step["optimizer_update_alone_ms"] > 0
        assert step["products_gflop"] <= step["flops_per_step"] / 1e9
        assert epoch["steps"] == 1 and epoch["ms_per_step"] > 0
    assert "pamfn" not in report  # only with --pamfn_dir


def test_train_step_benchmark_measures_the_library(tmp_path):
    """The single step and the scanned epoch of one phase (the cheaper one to compile:
    both phases run the same benchmark code; the fusion one is in the slow test)."""
    _train_step_report(tmp_path, ["unimodal"])


@pytest.mark.slow  # compiles the fusion step and epoch too (~1.5 min): make test-slow
def test_train_step_benchmark_measures_both_phases(tmp_path):
    _train_step_report(tmp_path, ["unimodal", "fusion"])


@pytest.mark.slow  # trains a preset end to end (~1 min of compilation): make test-slow
def test_peer_parity_reports_our_side_on_complementary_data(tmp_path):
    """benchmarks/peer_parity.py, our side only (no torch): readings per head and reading,
    timings, baselines, versions and the command, as JSON and Markdown."""
    out, table = tmp_path / "parity.json", tmp_path / "parity.md"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "peer_parity.py"),
           "--dataset=complementary", "--skip_pamfn", "--seeds=1", "--num_folds=2",
           "--num_videos=12", "--feature_dim=8", "--min_segments=4", "--max_segments=8",
           "--features=8", "--embed_features=16", "--candidates=2", "--unimodal_epochs=2",
           "--fusion_epochs=2", "--presets=recommended", f"--workdir={tmp_path / 'work'}",
           f"--out={out}", f"--markdown={table}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"].endswith(" ".join(cmd[2:]))
    assert report["versions"]["jax"] and report["versions"]["flax"]
    assert report["dataset"]["videos"] == 12 and report["dataset"]["score_max"] == 30.0
    assert report["folds"] == ["fold_1", "fold_2"] and report["seeds"] == [0]
    assert set(report["models"]) == {"ours-recommended"} and report["differences"] == {}
    model = report["models"]["ours-recommended"]
    assert set(model) == {"rgb", "flow", "mask", "fused", "branch-mean"}
    assert set(model.pop("branch-mean")) == {"final"}  # late fusion: the last epoch only
    for head in model.values():
        assert set(head) == {"final", "paper", "best-mean"}
        for reading in head.values():
            assert -1 <= reading["scc_mean"] <= 1 and reading["mae_mean"] > 0
            assert reading["n_seeds"] == 1 and len(reading["per_seed"][0]["epochs"]) == 2
    final = model["fused"]["final"]["per_seed"][0]
    assert final["epochs"] == [2, 2]  # the last epoch of each fold
    # the folds the library trained on are the benchmark's
    saved = json.loads((tmp_path / "work" / "ours-recommended" / "splits.json").read_text())
    assert [f["name"] for f in saved["folds"]] == report["folds"]
    timing = report["timing"]["ours-recommended"]
    for phase in ("unimodal", "fusion"):
        assert timing[phase]["runs_per_program"] == 2 and timing[phase]["ms_per_run_step"] > 0
    assert {"ridge (rgb)", "ridge (all)"} <= set(report["baselines"])
    assert len(report["curves"]["ours-recommended"]["fused"]["scc"]) == 2
    md = table.read_text()
    assert "| ours-recommended | fused |" in md and "ridge (all)" in md
    assert "| ours-recommended | branch-mean |" in md and "Fusion gain" in md
    assert report["fusion_gain"]["ours-recommended"]["best_branch"] in ("rgb", "flow", "mask")


@functools.lru_cache(maxsize=None)  # once per process: absl refuses a flag defined twice
def _benchmark(name):
    """benchmarks/<name>.py as a module (its absl flags are only defined, not parsed)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_peer_parity = functools.partial(_benchmark, "peer_parity")


def test_peer_parity_branch_mean_and_fusion_gain_against_scipy():
    """The late-fusion row (mean of the branches' final predictions) and the fused model's
    paired gains, against scipy on hand-made fold records; variants split at top-level
    commas only."""
    from scipy import stats
    pp = _peer_parity()
    rng = np.random.default_rng(0)
    records, expected = [], {}
    for seed in (0, 1):
        for fold in ("fold_1", "fold_2"):
            true = rng.uniform(6, 30, size=7)
            ids = [f"v{i}" for i in range(7)]
            preds = {h: true + rng.normal(scale=s, size=7)
                     for h, s in (("rgb", 4), ("flow", 6), ("mask", 8), ("fused", 3))}
            models = {h: {"history": [{"epoch": 3, "scc": stats.spearmanr(p, true)[0],
                                       "mae": float(np.mean(np.abs(p - true)))}],
                          "predictions": {"final": {"epoch": 3, "video_ids": ids,
                                                    "true": true.tolist(), "pred": p.tolist()}}}
                      for h, p in preds.items()}
            records.append({"name": fold, "seed": seed, "models": models})
            late = np.mean([preds[m] for m in ("rgb", "flow", "mask")], axis=0)
            expected.setdefault(seed, []).append(
                (stats.spearmanr(late, true)[0], np.mean(np.abs(late - true)),
                 {h: stats.spearmanr(p, true)[0] for h, p in preds.items()}))
    readings = pp.per_seed_readings(records)
    for seed, rows in expected.items():
        scc, mae, _ = readings[pp.BRANCH_MEAN]["final"][seed]
        assert scc == pytest.approx(np.mean([r[0] for r in rows]), abs=1e-12)
        assert mae == pytest.approx(np.mean([r[1] for r in rows]), abs=1e-9)
    gain = pp.fusion_gain(readings)
    per_seed = {h: [np.mean([r[2][h] for r in rows]) for rows in expected.values()]
                for h in ("rgb", "flow", "mask", "fused")}
    best = max(("rgb", "flow", "mask"), key=lambda h: np.mean(per_seed[h]))
    assert gain["best_branch"] == best
    diffs = np.subtract(per_seed["fused"], per_seed[best])
    assert gain[f"fused - {best}"]["scc_diff"] == pytest.approx(diffs.mean(), abs=1e-12)
    half = stats.t.ppf(0.975, 1) * diffs.std(ddof=1) / np.sqrt(2)
    assert gain[f"fused - {best}"]["scc_diff_ci95"] == pytest.approx(half, rel=1e-9)
    late_diffs = [per_seed["fused"][i] - np.mean([r[0] for r in rows])
                  for i, rows in enumerate(expected.values())]
    assert gain[f"fused - {pp.BRANCH_MEAN}"]["scc_diff"] == pytest.approx(np.mean(late_diffs))
    records[0]["models"]["mask"]["predictions"]["final"]["video_ids"] = list("abcdefg")
    with pytest.raises(pp.ParityError, match="different videos"):
        pp.branch_mean_readings(records)
    assert pp.parse_variant("t=pamfn:model.trainable_branches=('rgb', 'mask'),model.init=flax") \
        == ("t", "pamfn", {"model.trainable_branches": ("rgb", "mask"), "model.init": "flax"})


def test_peer_parity_starts_ours_from_pamfns_initial_weights():
    """`model.init_weights=pamfn`: a PAMFN state dict (the fixture written by PAMFN's own
    modules) becomes every variable of `pamfn`-preset ours, each equal to its mapped
    PAMFN entry; a preset without PAMFN's parameters is refused by name."""
    from flax import traverse_util
    from surgfusion_jax import config_lib
    from surgfusion_jax.models import pamfn_weights
    pp = _peer_parity()
    with np.load(os.path.join(REPO, "tests", "fixtures", "pamfn", "pamfn_reference.npz")) as z:
        state = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    config = config_lib.get_config()
    config.preset = "pamfn"
    config.model.features, config.model.embed_features, config.model.num_candidates = 8, 512, 3
    rgb_in = state["model_r.embedding.0.weight"]  # [512, in, 1]
    template = pp.our_template(config, rgb_in.shape[1])
    got = traverse_util.flatten_dict(pp.initial_weights_from_pamfn(state, template, "pamfn"))
    np.testing.assert_array_equal(got[("params", "branch_rgb", "head", "bias")],
                                  state["model_r.fc.1.bias"])
    log_tau = got[("params", "fusion", "log_tau")]
    np.testing.assert_allclose(log_tau, np.log(state["tau"]), rtol=1e-6)
    assert set(got) == set(traverse_util.flatten_dict(template))
    want = traverse_util.flatten_dict(pamfn_weights.from_pamfn(state, template))
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)
    config.preset = "recommended"
    with pytest.raises(pp.ParityError, match="init_weights=pamfn.*'recommended'"):
        pp.initial_weights_from_pamfn(state, pp.our_template(config, rgb_in.shape[1]),
                                      config.preset)


def test_peer_parity_shares_the_unimodal_phase_only_when_it_is_the_same(tmp_path):
    """`--share_unimodal`: a variant that changes only fusion-phase fields gets a copy of
    its preset's finished unimodal checkpoints (every run, with their logs); a variant
    that changes the model or the unimodal phase, or an unfinished source, gets none."""
    from surgfusion_jax import config_lib
    from surgfusion_jax.io import write_json
    from surgfusion_jax.training import cross_validation
    pp = _peer_parity()

    def config(**overrides):
        c = config_lib.get_config()
        c.preset = "recommended"
        c.data.score_max = 40.0
        c.unimodal.num_epochs = 6
        for field, value in overrides.items():
            section, name = field.split("__")
            c[section][name] = value
        return c

    source = tmp_path / "ours-recommended"
    members = [f"seed_{s}/fold_{f}" for s in (0, 1) for f in (1, 2)]
    for m in members:
        for step in (5, 6):
            (source / "checkpoints" / m / "unimodal" / "last" / str(step)).mkdir(parents=True)
        (source / "checkpoints" / m / "unimodal" / "last" / "6" / "state").write_text(m)
        (source / "tensorboard" / m / "unimodal").mkdir(parents=True)
        (source / "checkpoints" / m / "fusion" / "last" / "6").mkdir(parents=True)
    write_json(str(source / "config.json"),
               cross_validation.run_config_dict(config_lib.resolve(config())), sort_keys=True)

    target = tmp_path / "ours-wd"
    assert pp.share_unimodal_phase(str(source), str(target),
                                   config(fusion__weight_decay=0.01, model__gumbel_at_test=True)) == 4
    for m in members:
        state = target / "checkpoints" / m / "unimodal" / "last" / "6" / "state"
        assert state.read_text() == m
        assert (target / "tensorboard" / m / "unimodal").is_dir()
        assert not (target / "checkpoints" / m / "fusion").exists()
    assert pp.share_unimodal_phase(str(source), str(target), config(fusion__weight_decay=0.01)) == 0
    assert pp.share_unimodal_phase(str(source), str(tmp_path / "dropout"),
                                   config(model__broadcast_dropout=False)) == 4

    for changed in (config(model__alpha_bias_init=0.0), config(unimodal__clip_per_branch=True),
                    config(model__attention_output_projection=False)):
        assert pp.share_unimodal_phase(str(source), str(tmp_path / "other"), changed) == 0
    assert not (tmp_path / "other").exists()

    one_seed = tmp_path / "one-seed"  # a run of one seed names its runs by fold alone
    for m in ("fold_1", "fold_2"):
        (one_seed / "checkpoints" / m / "unimodal" / "last" / "6").mkdir(parents=True)
    (one_seed / "config.json").write_text((source / "config.json").read_text())
    assert pp.share_unimodal_phase(str(one_seed), str(tmp_path / "one-seed-wd"),
                                   config(fusion__weight_decay=0.01)) == 2
    assert (tmp_path / "one-seed-wd" / "checkpoints" / "fold_2" / "unimodal" / "last" / "6").is_dir()

    import shutil
    shutil.rmtree(source / "checkpoints" / members[-1] / "unimodal" / "last" / "6")
    assert pp.share_unimodal_phase(str(source), str(tmp_path / "early"),
                                   config(fusion__weight_decay=0.01)) == 0


def test_xla_products_finds_every_product_of_a_compiled_step():
    """The products-alone floor reads each dot of a compiled module (inside fusions too)
    with its shapes and dimension numbers: the FLOPs it sums are the hand count of the
    four products of a plain and a batched product's forward and weight gradient."""
    import jax
    import jax.numpy as jnp
    xp = _benchmark("xla_products")

    def loss(w, v, x, u):  # x [N, C] @ w [C, D]; batched u [K, N, D] @ v [K, D, E]
        return jnp.sum(jnp.sin(x @ w)) + jnp.sum(jnp.sin(jnp.einsum("knd,kde->kne", u, v)))

    n, c, d, k, e = 32, 16, 8, 3, 4
    args = (jnp.ones((c, d)), jnp.ones((k, d, e)), jnp.ones((n, c)), jnp.ones((k, n, d)))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))  # x and u are not differentiated
    found = xp.products(grad.lower(*args).compile().as_text())
    assert sum(found.values()) == 4, found  # two forward, two weight gradients
    floor = xp.products_alone(found, repeats=2)
    assert floor["products"] == 4
    hand_count = 2 * (2 * n * c * d + 2 * k * n * d * e)  # two products of each
    assert floor["products_gflop"] == pytest.approx(hand_count / 1e9)
    assert floor["products_alone_ms"] > 0


def test_xla_products_refuses_a_product_inside_a_loop_or_a_branch():
    import jax
    import jax.numpy as jnp
    xp = _benchmark("xla_products")
    looped = jax.jit(lambda w, x, n: jax.lax.fori_loop(0, n, lambda _, h: jnp.tanh(h @ w), x))
    text = looped.lower(jnp.ones((8, 8)), jnp.ones((4, 8)), 3).compile().as_text()
    assert " dot(" in text
    with pytest.raises(ValueError, match="loop body"):
        xp.products(text)
    branchy = jax.jit(lambda w, x, p: jax.lax.cond(p, lambda h: h @ w, jnp.tanh, x))
    text = branchy.lower(jnp.ones((8, 8)), jnp.ones((8, 8)), True).compile().as_text()
    assert "conditional(" in text
    with pytest.raises(ValueError, match="conditional branch"):
        xp.products(text)
