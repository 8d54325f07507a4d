"""surgfusion-jax: SurgFusion-Net (He et al.) and Divergence Regulated Attention in JAX/Flax.

The model API is importable from the package root; the names load lazily, so
`import surgfusion_jax.data.feature_dataset` (prep stage) does not pull in JAX or Flax.
"""

import importlib

_EXPORTS = {
    "DRA": "surgfusion_jax.models.dra",
    "from_mha_params": "surgfusion_jax.models.dra",
    "SurgFusionNet": "surgfusion_jax.models.surgfusion",
    "csfb_modality_weights": "surgfusion_jax.models.surgfusion",
    "UnimodalBranch": "surgfusion_jax.models.branches",
    "CrossStageFusionBlock": "surgfusion_jax.models.csfb",
    "DynamicFusionBlock": "surgfusion_jax.models.dfb",
    "skill_loss": "surgfusion_jax.models.losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'surgfusion_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
