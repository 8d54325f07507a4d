"""Learning: on complementary data the fused model beats every branch (issue: fusion works).

`data_prep.complementary` gives each modality an independent third of the score, so a
branch can explain at most a third of it and fusion is the only way to the rest. A tiny
model under the `recommended` preset (modality dropout off and Flax's initialisation, see
below), two seeds x four folds trained as one program, must end (final epoch: the
unbiased reading) with a fused SCC above every branch's by a clear margin. It fails if
fusion ignores modalities, if the frozen branches' features do not reach it, or if
training stops learning.
"""
import numpy as np
import pytest

from data_prep import complementary
from surgfusion_jax import config_lib
from surgfusion_jax.training import cross_validation


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    complementary.write_complementary(str(root), "comp", num_videos=64, feature_dim=16,
                                      min_segments=8, max_segments=16, signal=8.0, seed=0)
    config = config_lib.get_config()  # preset 'recommended'
    # Off here: at this tiny width (d = 16, K = 2, 2 seeds) recommended's 0.3 left the fused
    # model only +0.078 above its best branch (docs/parity.md, "Modality dropout").
    config.model.modality_dropout = 0.0
    # Flax's initialisation here: recommended's PyTorch one (measured best at d = 64,
    # docs/parity.md) left the rgb and flow branches at SCC 0.20 / 0.25 at this width and
    # the fused model only +0.035 above its best branch.
    config.model.init = "flax"
    config.data.data_dir, config.data.name, config.data.window = str(root), "comp", 16
    config.model.features, config.model.embed_features, config.model.num_candidates = 16, 32, 2
    config.num_seeds, config.cv.num_folds = 2, 4
    for phase in (config.unimodal, config.fusion):
        phase.num_epochs, phase.batch_size = 60, 8
    config.fusion.learning_rate, config.fusion.head_lr_factor = 3e-3, 1.0  # few steps (demo)
    config.progress_bar, config.csfb_plots = False, 0
    config.min_bucket = config.eval_batch_size = 16
    config.checkpoint_every_epochs = 60
    out, _ = cross_validation.run_cross_validation(config, str(root / "run"))
    return out


def test_fused_beats_every_branch_on_complementary_cues(results):
    final = {head: s["final"]["scc_mean"] for head, s in results["summary"].items()}
    branches = {h: v for h, v in final.items() if h != "fused"}
    assert set(branches) == {"rgb", "flow", "mask"}
    assert final["fused"] > max(branches.values()) + 0.1, final
    # Each branch still learns its own share (a third of the score: SCC well below fused).
    assert min(branches.values()) > 0.0, final
    assert np.isfinite(results["baselines"]["ridge (all)"]["scc_mean"])
