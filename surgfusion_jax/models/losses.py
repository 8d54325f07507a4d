"""Training loss of SurgFusion-Net, Eq. 19: L = alpha * MSE + (1 - alpha) * MAE."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def skill_loss(pred: Array, target: Array, alpha: float = 0.5,
               weights: Array | None = None) -> Array:
    """Eq. 19 on normalised labels (alpha = 0.5 in the paper).

    Args:
      pred: [B] predicted scores.
      target: [B] normalised labels (0.5 * score / score_max).
      alpha: weight of the MSE term; 1 - alpha weighs the MAE term.
      weights: optional [B] non-negative sample weights (e.g. 0 for batch padding);
        both means become weighted means sum(w * e) / sum(w).

    Returns:
      A float32 scalar.
    """
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if pred.shape != target.shape:
        raise ValueError(f"skill_loss: pred {pred.shape} and target {target.shape} "
                         "must have the same shape.")
    err = pred - target
    if weights is None:
        mse, mae = jnp.mean(err ** 2), jnp.mean(jnp.abs(err))
    else:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape != pred.shape:
            raise ValueError(f"skill_loss: weights {weights.shape} must match pred "
                             f"{pred.shape}.")
        total = jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)
        mse = jnp.sum(weights * err ** 2) / total
        mae = jnp.sum(weights * jnp.abs(err)) / total
    return alpha * mse + (1.0 - alpha) * mae
