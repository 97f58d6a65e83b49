"""Import TensorFlow quietly and keep it to the input pipeline.

TensorFlow must never take an accelerator from JAX nor flood the terminal, so every
import of it in clip-jax goes through ``import_tf``.
"""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType


@cache
def import_tf() -> ModuleType:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import logging

    import tensorflow as tf

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    tf.get_logger().setLevel(logging.ERROR)
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # already initialised, or no such device type
    return tf
