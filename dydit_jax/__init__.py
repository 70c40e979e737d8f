"""dydit-jax: DiT / DyDiT (dynamic width and tokens) in JAX/Flax."""

__version__ = "0.1.0"
