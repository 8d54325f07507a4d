"""surgfusion-jax: SurgFusion-Net (He et al.) and Divergence Regulated Attention in JAX/Flax.

The model API is importable from the package root; the names load lazily, so
`import surgfusion_jax.feature_dataset` (prep stage) does not pull in JAX or Flax.
"""

import importlib

_EXPORTS = {
    "DRA": "surgfusion_jax.dra",
    "SurgFusionNet": "surgfusion_jax.surgfusion",
    "csfb_modality_weights": "surgfusion_jax.surgfusion",
    "UnimodalBranch": "surgfusion_jax.branches",
    "CrossStageFusionBlock": "surgfusion_jax.csfb",
    "DynamicFusionBlock": "surgfusion_jax.dfb",
    "skill_loss": "surgfusion_jax.losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'surgfusion_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
