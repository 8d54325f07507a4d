"""Test-wide settings: quiet TensorFlow, JAX on the CPU, float32 matmuls exact enough."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
