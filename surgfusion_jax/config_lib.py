"""Config builders of SurgFusion-Net training (paper §III-B.4 and §IV-B; docs/design.md §4-5).

Dataset configs (`configs/rarp.py`, `rah.py`, `jigsaws_*.py`) start from `get_config()` and
override the dataset fields. Every value can be changed on the command line, e.g.

  python -m surgfusion_jax.main --config=configs/rarp.py \
      --config.fusion.num_epochs=5 --config.workdir=/tmp/run

`small(config)` turns any config into a quick check (tiny model, few epochs); dataset
configs expose it as `--config=configs/rarp.py:small`.

Presets. Where the paper's text, PAMFN's code (the PyTorch implementation SurgFusion-Net
builds on) and our measurements disagree, the setting is a *switch*: a config field left
as a placeholder (None) that `resolve` fills from `PRESETS[config.preset]`:
  'pamfn'        PAMFN's training behaviour, switch by switch;
  'paper'        the paper's text where it speaks, PAMFN where it is silent;
  'recommended'  our default: the choices measured or expected to learn best; the
                 side-by-side in docs/parity.md is where each is (or is still to be)
                 measured.
A switch given a value (in a config file or `--config.model.init=flax`) keeps it. The
paper-dataset configs and experiments/ use 'paper'; the demo and new data 'recommended'.
"""

from typing import Any

import ml_collections
from ml_collections import config_dict

from surgfusion_jax import errors
from surgfusion_jax.data import feature_dataset

# Switch -> value per preset. Sources: PAMFN = github.com/qinghuannn/PAMFN (pipeline.py,
# models/pamfn.py, datasets.py); paper = He et al. §III-B / §IV-B; docs/parity.md has the
# measured effect of each.
PRESETS: dict[str, dict[str, Any]] = {
    "pamfn": {
        "data.target_max": 1.0,  # datasets.py: label = score / max score
        "data.mask_padding": False,  # datasets.py: zero_padding_torch, no mask
        "loss_alpha": 1.0,  # BaseModel/PAMFN.call_loss: nn.MSELoss
        "model.init": "torch",  # nn.Linear / nn.Conv1d reset_parameters
        "model.fusion": "negative_ca",  # Multi_Head_Attention: -QK^T scores
        "model.num_heads": 1,  # configs: ms_heads = cm_heads = 1
        "model.attention_output_projection": False,  # Q, K, V linears only
        "model.dra_relative_eps": 0.0,  # no Eq. 15 (negative_ca); kept at the paper's
        "model.broadcast_dropout": False,  # nn.Dropout on the attention weights
        "model.gumbel_at_test": True,  # F.gumbel_softmax in eval mode too
        "model.frozen_branch_train": True,  # model.train() reaches the loaded branches
        # models/pamfn.py PAMFN.forward: feat_a is not .detach()ed (slot A = our mask)
        "model.trainable_branches": ("mask",),
        "model.modality_dropout": 0.0,  # none
        "model.fused_score": "fusion_head",  # PAMFN.forward returns the fusion head's output
        "model.pool_odd_step": "drop",  # nn.AvgPool1d(2, 2) drops an odd last step
        "model.bn_unbiased_running_var": True,  # nn.BatchNorm1d's running_var update
        "unimodal.clip_per_branch": True,  # one run (and one clip) per branch
        "fusion.weight_decay": 0.01,  # torch.optim.AdamW(params, lr): the default 0.01
        "fusion.head_lr_factor": 0.1,  # pipeline.py: the regression head at lr x 0.1
    },
    "paper": {
        "data.target_max": 0.5,  # §III-B.1: labels normalised to [0, 0.5]
        "data.mask_padding": False,  # silent (§III-B.4: zero padding) -> PAMFN
        "loss_alpha": 0.5,  # Eq. 19, alpha = 0.5
        "model.init": "torch",  # silent -> PAMFN (the paper's code is PyTorch)
        "model.fusion": "dra",  # §III-B.5
        "model.num_heads": 2,  # Table V
        "model.attention_output_projection": True,  # Eq. 18 (W^O)
        "model.dra_relative_eps": 0.0,  # Eq. 15 as printed: eps = 1e-8 alone
        "model.broadcast_dropout": False,  # silent -> PAMFN
        "model.gumbel_at_test": True,  # silent -> PAMFN
        "model.frozen_branch_train": True,  # "frozen" only; BatchNorm mode silent -> PAMFN
        "model.trainable_branches": (),  # §III-B.2, §IV-B: "unimodal branches are frozen"
        "model.modality_dropout": 0.0,  # none
        "model.fused_score": "fusion_head",  # §III-B.2, §IV-B: branch heads disabled in fusion
        "model.pool_odd_step": "drop",  # silent -> PAMFN
        "model.bn_unbiased_running_var": True,  # silent -> PAMFN
        "unimodal.clip_per_branch": True,  # silent -> PAMFN
        "fusion.weight_decay": 0.01,  # AdamW without a value -> PAMFN (PyTorch's default)
        "fusion.head_lr_factor": 0.1,  # silent -> PAMFN
    },
    "recommended": {
        "data.target_max": 1.0,
        "data.mask_padding": True,
        "loss_alpha": 0.5,
        "model.init": "torch",  # measured over 10 seeds: docs/parity.md, "Per-switch effects"
        "model.fusion": "dra",
        "model.num_heads": 2,
        "model.attention_output_projection": True,
        # Eq. 15 with the paper's eps alone diverged (NaN) in 40 of 40 runs: docs/parity.md
        "model.dra_relative_eps": 1e-2,
        "model.broadcast_dropout": True,
        "model.gumbel_at_test": False,
        "model.frozen_branch_train": False,
        "model.trainable_branches": (),
        # measured over 10 seeds: docs/parity.md, "Modality dropout"
        "model.modality_dropout": 0.3,
        # measured over 10 seeds: docs/parity.md, "Fused score"
        "model.fused_score": "mean_of_heads",
        # ours: no step of a video is left out of the pooling (not measured against PAMFN's)
        "model.pool_odd_step": "keep",
        "model.bn_unbiased_running_var": False,  # Flax's BatchNorm (not measured)
        "unimodal.clip_per_branch": False,
        "fusion.weight_decay": 1e-4,
        # measured: fused MAE -0.55 +- 0.21, SCC +0.005 +- 0.045 against x0.1 (docs/parity.md)
        "fusion.head_lr_factor": 1.0,
    },
}


class PresetError(errors.UserError, ValueError):
    """An unknown `config.preset`."""


def _placeholder(kind: type) -> Any:
    return config_dict.placeholder(kind)


# Fields added after runs were saved, with the value that a run saved without them had
# (a resumed run's saved config is compared with the current one: cross_validation).
ADDED_FIELDS = {"model.init_weights": ""}


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = ""  # empty: runs/<data.name>
    # Fills every switch left None below (module docstring, PRESETS).
    config.preset = "recommended"  # pamfn | paper | recommended
    config.seed = 0
    # Seeds seed, seed + 1, ...: every fold is trained once per seed; results report the
    # mean and 95% CI over seeds (docs/design.md §5).
    config.num_seeds = 1
    # All runs (folds x seeds) train in lockstep as one vmapped program; > 0 splits them
    # into groups of at most this many (memory), each group one program.
    config.max_runs_per_program = 0
    # How a program runs its group: 'vmap' batches the runs (fast); 'map' loops over them,
    # so each run's numbers equal that run trained alone bit for bit (docs/design.md §4.9).
    config.run_axis = "vmap"

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = "data/features"
    config.data.name = ""
    # target = target_max * score / score_max (docs/design.md §1.7); 0: the maximum of the
    # dataset's score scale (its metadata); another value must equal it.
    config.data.score_max = 0.0
    config.data.target_max = _placeholder(float)  # switch: 0.5 paper, 1.0 PAMFN
    config.data.window = 64  # training segments per sample (consecutive, zero-padded; §III-B.4)
    config.data.mask_padding = _placeholder(bool)  # switch: masked (ours) or literal zeros
    config.data.modalities = feature_dataset.MODALITIES
    # The paper's numbers printed beside ours (paper_results.reference_scores); '' = none.
    config.data.paper_dataset = ""  # jigsaws | rah | rarp
    config.data.paper_task = ""  # JIGSAWS: suturing | knot_tying | needle_passing

    config.model = ml_collections.ConfigDict()
    config.model.features = 256  # d
    config.model.embed_features = 512
    config.model.num_candidates = 10  # K FusionNets
    config.model.fusion = _placeholder(str)  # switch: avg | cat | vanilla_ca | negative_ca | dra
    config.model.num_heads = _placeholder(int)  # switch: Table V (2) or PAMFN (1)
    config.model.use_dfb = True
    config.model.dtype = "float32"
    config.model.init = _placeholder(str)  # switch: flax (lecun-normal) | torch (PAMFN)
    # '' draws the initial weights (model.init); else an .npz per seed ('{seed}' in the
    # name) to start from instead (training/initial_weights.py; the parity benchmark)
    config.model.init_weights = ""
    config.model.embed_dropout = 0.3  # branch embedding (PAMFN BaseModel)
    config.model.branch_head_dropout = 0.5  # branch head (PAMFN drop_rate)
    config.model.feature_dropout = 0.5  # frozen features into fusion (PAMFN feat_drop)
    # switch: whole modalities dropped per sample in fusion training (ours, design §4.11)
    config.model.modality_dropout = _placeholder(float)
    config.model.head_dropout = 0.0  # fusion head input (PAMFN fc_drop)
    config.model.head_hidden_dropout = 0.5  # fusion head hidden (PAMFN)
    config.model.head_hidden_ratio = 2  # fusion head width = features / this (PAMFN fc_r)
    config.model.attention_dropout = 0.1  # CSFB/DFB attention weights (PAMFN)
    config.model.tau_init = 10.0  # Gumbel temperature, learned (PAMFN)
    config.model.alpha_bias_init = 2.0  # DRA alpha logit at init (ours, docs/design.md §3.2)
    # switch: rho in Eq. 15's denominator ||P_main||^2 + eps + rho mean_h ||A_mix_h||^2;
    # 0 = the paper, 1e-2 ours (`dra_decode.projection_coefficients`, docs/parity.md)
    config.model.dra_relative_eps = _placeholder(float)
    config.model.broadcast_dropout = _placeholder(bool)  # switch: Flax's shared mask
    config.model.attention_output_projection = _placeholder(bool)  # switch: W^O (Eq. 18)
    config.model.gumbel_at_test = _placeholder(bool)  # switch: PAMFN samples at test
    config.model.frozen_branch_train = _placeholder(bool)  # switch: PAMFN's train-mode BN
    # switch: branches that keep training in the fusion phase (PAMFN: its third, undetached)
    config.model.trainable_branches = _placeholder(tuple)
    # switch: evaluation 'fused' score = the fusion head (paper) or the mean of it and the
    # branch heads (ours; SurgFusionNet docstring, "Fused score")
    config.model.fused_score = _placeholder(str)
    # switch: stride-2 pooling of an odd number of steps keeps the last one (ours) or
    # drops it (PyTorch's AvgPool1d, PAMFN); layers.Conventions
    config.model.pool_odd_step = _placeholder(str)
    # switch: BatchNorm running variance from the unbiased batch variance (PyTorch, PAMFN)
    config.model.bn_unbiased_running_var = _placeholder(bool)

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
    config.unimodal.clip_per_branch = _placeholder(bool)  # switch: one clip per branch (PAMFN)

    # Phase (b): fusion branch on the frozen unimodal branches, AdamW.
    config.fusion = ml_collections.ConfigDict()
    config.fusion.num_epochs = 300
    config.fusion.batch_size = 16
    config.fusion.learning_rate = 1e-3
    config.fusion.end_learning_rate = 5e-6
    config.fusion.weight_decay = _placeholder(float)  # switch: AdamW decay
    config.fusion.grad_clip = 2.0
    config.fusion.head_lr_factor = _placeholder(float)  # switch: head at lr x this (MAQA 0.1)
    config.fusion.init_from = "last"  # unimodal checkpoint used: last | best

    config.loss_alpha = _placeholder(float)  # switch; Eq. 19: alpha MSE + (1 - alpha) MAE
    config.eval_batch_size = 8
    config.min_bucket = 8  # eval lengths are padded to powers of two >= this
    config.checkpoint_every_epochs = 5  # `last`; also at a phase's end and on a stop
    config.progress_bar = True
    config.csfb_plots = 8  # Fig. 4-style plots after a run: videos across the score range (0: all)
    config.compilation_cache_dir = ""  # JAX persistent compilation cache ('' = off)

    config.debug = ml_collections.ConfigDict()
    config.debug.stop_after_epochs = 0  # > 0: stop after this many epochs (resume tests)
    return config


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose switches left None take `config.preset`'s values.

    Idempotent; training, loading and the benchmarks call it, and runs save its result."""
    if config.get("preset") not in PRESETS:
        raise PresetError(f"config.preset = {config.get('preset')!r} is not one of "
                          f"{sorted(PRESETS)}; set --config.preset=recommended (or paper, "
                          "pamfn).")
    resolved = ml_collections.ConfigDict(config.to_dict())
    for path, value in PRESETS[config.preset].items():
        section, _, name = path.rpartition(".")
        parent = resolved[section] if section else resolved
        if parent.get(name) is None:
            parent[name] = value
    return resolved


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
    config.preset = "paper"
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
