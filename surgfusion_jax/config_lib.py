"""Config builders of SurgFusion-Net training (paper §III-B.4 and §IV-B; docs/design.md §4-5).

Dataset configs (`configs/rarp.py`, `rah.py`, `jigsaws_*.py`) start from `get_config()` and
override the dataset fields. Every value can be changed on the command line, e.g.

  python -m surgfusion_jax.main --config=configs/rarp.py \
      --config.fusion.num_epochs=5 --config.workdir=/tmp/run

`small(config)` turns any config into a quick check (tiny model, few epochs); dataset
configs expose it as `--config=configs/rarp.py:small`.
"""

import ml_collections

from surgfusion_jax.data import feature_dataset


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = ""  # empty: runs/<data.name>
    config.seed = 0
    # Seeds seed, seed + 1, ...: every fold is trained once per seed; results report the
    # mean and 95% CI over seeds (docs/design.md §5).
    config.num_seeds = 1
    # All runs (folds x seeds) train in lockstep as one vmapped program; > 0 splits them
    # into groups of at most this many (memory), each group one program.
    config.max_runs_per_program = 0

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = "data/features"
    config.data.name = ""
    config.data.score_max = 30.0  # target = 0.5 * score / score_max (docs/design.md §1)
    config.data.window = 64  # training segments per sample (consecutive, zero-padded)
    config.data.modalities = feature_dataset.MODALITIES
    # The paper's numbers printed beside ours (paper_results.reference_scores); '' = none.
    config.data.paper_dataset = ""  # jigsaws | rah | rarp
    config.data.paper_task = ""  # JIGSAWS: suturing | knot_tying | needle_passing

    config.model = ml_collections.ConfigDict()
    config.model.features = 256  # d
    config.model.embed_features = 512
    config.model.num_candidates = 10  # K FusionNets
    config.model.num_heads = 2
    config.model.fusion = "dra"  # avg | cat | vanilla_ca | negative_ca | dra
    config.model.use_dfb = True
    config.model.dtype = "float32"

    config.cv = ml_collections.ConfigDict()
    config.cv.scheme = "kfold"  # kfold | loso | louo
    config.cv.num_folds = 4  # kfold only; loso/louo take their folds from the data
    config.cv.seed = 0
    config.cv.setup_dir = ""  # JIGSAWS Experimental_setup folder (optional, LOSO/LOUO)
    config.cv.inner_val_fraction = 0.0  # > 0: hold out part of each training fold
    config.cv.folds = ()  # empty: every fold; else the fold numbers to run

    # Phase (a): unimodal branches, SGD (paper §IV-B).
    config.unimodal = ml_collections.ConfigDict()
    config.unimodal.num_epochs = 300
    config.unimodal.batch_size = 16
    config.unimodal.learning_rate = 1e-2
    config.unimodal.end_learning_rate = 5e-6
    config.unimodal.momentum = 0.9
    config.unimodal.weight_decay = 1e-4
    config.unimodal.grad_clip = 2.0  # global norm (MAQA); 0 disables

    # Phase (b): fusion branch on the frozen unimodal branches, AdamW.
    config.fusion = ml_collections.ConfigDict()
    config.fusion.num_epochs = 300
    config.fusion.batch_size = 16
    config.fusion.learning_rate = 1e-3
    config.fusion.end_learning_rate = 5e-6
    config.fusion.weight_decay = 1e-4
    config.fusion.grad_clip = 2.0
    config.fusion.head_lr_factor = 0.1  # fusion regression head (MAQA)
    config.fusion.init_from = "last"  # unimodal checkpoint used: last | best

    config.loss_alpha = 0.5  # Eq. 19: alpha * MSE + (1 - alpha) * MAE
    config.eval_batch_size = 8
    config.min_bucket = 8  # eval lengths are padded to powers of two >= this
    config.checkpoint_every_epochs = 5  # `last`; also at a phase's end and on a stop
    config.progress_bar = True
    config.csfb_plots = 8  # Fig. 4-style plots after a run: videos across the score range (0: all)
    config.compilation_cache_dir = ""  # JAX persistent compilation cache ('' = off)

    config.debug = ml_collections.ConfigDict()
    config.debug.stop_after_epochs = 0  # > 0: stop after this many epochs (resume tests)
    return config


def small(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A quick-check version of `config`: tiny model, 3 + 3 epochs, short windows."""
    config.model.features = 16
    config.model.embed_features = 32
    config.model.num_candidates = 3
    config.data.window = 16
    for phase in (config.unimodal, config.fusion):
        phase.num_epochs = 3
    return config


def with_arg(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    """Applies the `configs/<name>.py:<arg>` suffix: '' (paper settings) or 'small'."""
    if arg == "small":
        return small(config)
    if arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':small' or nothing")
    return config


def paper_config(name: str, paper_dataset: str, *, batch_size: int, scheme: str = "kfold",
                 task: str = "") -> ml_collections.ConfigDict:
    """A paper dataset's settings (§IV-B): scores out of 30, `scheme` CV (k-fold: 4 folds),
    `batch_size` in both phases; `name` is the prepared feature dataset."""
    config = get_config()
    config.data.name = name
    config.data.score_max = 30.0
    config.data.paper_dataset = paper_dataset
    config.data.paper_task = task
    config.cv.scheme = scheme
    config.unimodal.batch_size = batch_size
    config.fusion.batch_size = batch_size
    return config


def jigsaws_config(task: str) -> ml_collections.ConfigDict:
    """JIGSAWS task (suturing | knot_tying | needle_passing): GRS 6-30, LOSO, batch 16."""
    return paper_config(f"jigsaws_{task}", "jigsaws", batch_size=16, scheme="loso", task=task)


def load_config_file(path: str, arg: str = "") -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file such as `configs/rarp.py`, loaded as
    `--config=<path>[:<arg>]` loads it (for programs that combine several configs)."""
    import importlib.util
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
