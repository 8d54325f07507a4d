"""The feature dataset contract, the on-device input pipeline and the CV splits.

Nothing is imported here, so the prep stage can use `surgfusion_jax.data.feature_dataset`
without pulling in JAX."""
