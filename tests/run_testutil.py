"""A trained-looking run without training, for the prediction tests.

`write_fake_run` assembles a workdir as `python -m surgfusion_jax.main` leaves it
(config.json, splits.json, one fusion `last` checkpoint per fold) with random weights,
so the tests that read runs need no training and one reference compile.
"""
import json
import os

import jax
import numpy as np

from surgfusion_jax.data import feature_dataset as fd, splits
from surgfusion_jax.training import checkpoints, cross_validation as cv, train


def random_variables(model, feature_dim, seed):
    """Random weights of the model's shapes (no init compile); BN variances positive."""
    rng = np.random.default_rng(seed)
    abstract = train.abstract_variables(model, feature_dim)

    def fill(path, leaf):
        if "'var'" in jax.tree_util.keystr(path):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        return (0.3 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def write_fake_run(workdir, config, samples, feature_dim, num_folds=2):
    """Writes the run of the resolved `config` on `samples` (2-fold k-fold, seed 0) with
    random fusion weights per fold; returns (model, folds, {fold name: variables})."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(cv.run_config_dict(config), f)
    folds = splits.make_splits(samples, "kfold", num_folds, seed=0)
    splits.save_splits(folds, os.path.join(workdir, "splits.json"))
    model = train.build_model(config.model, fd.MODALITIES)
    variables = {}
    for k, fold in enumerate(folds):
        variables[fold.name] = random_variables(model, feature_dim, k)
        state = train.create_train_state(model, variables[fold.name], train.make_optimizer(
            "fusion", config.fusion), "fusion", learning_rate=0.0)
        ck = checkpoints.PhaseCheckpoints(os.path.join(workdir, "checkpoints", fold.name, "fusion"))
        ck.save_last(3, state, jax.random.PRNGKey(0), {"history": []})
        ck.close()
    return model, folds, variables
