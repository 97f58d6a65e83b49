"""clipctl: the terminal launcher for clip-jax."""

__version__ = "0.1.0"
