"""SurgFusion-Net in pure Flax (no I/O): one paper component per module."""
