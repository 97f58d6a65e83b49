"""The teacher terms' reduction holds chunks of the (rows, K) logits, not the whole batch's.

XLA's compiled memory analysis (no execution) of the loss and its gradient at one
device's share of siglip2-b16's masked prediction: 2,048 pairs per device over 16
devices, 98 masked patches each, K = 8,192 prototypes, a 256-wide bottleneck."""

import jax
import jax.numpy as jnp

from clip_jax.models.distillation import Projected, distillation_values
from tests.test_self_supervised import dense_values_of

BATCH, PATCHES, PROTOTYPES, BOTTLENECK = 2048 // 16, 98, 8192, 256


def temporaries(values_of) -> int:
    """Bytes of temporaries XLA assigns to the value and gradient (w.r.t. the student's
    features and prototypes) of ``values_of(student, teacher)["loss"]``."""

    def loss(student_features, student_prototypes, teacher_features, teacher_prototypes):
        student = Projected(student_features, student_prototypes)
        teacher = Projected(teacher_features, teacher_prototypes)
        return values_of(student, teacher)["loss"]

    features = jax.ShapeDtypeStruct((BATCH, PATCHES, BOTTLENECK), jnp.float32)
    prototypes = jax.ShapeDtypeStruct((PROTOTYPES, BOTTLENECK), jnp.float32)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = step.lower(features, prototypes, features, prototypes).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_chunked_reduction_needs_a_fraction_of_the_dense_ones_memory():
    dense = temporaries(dense_values_of)  # several (12,544 x 8,192) float32 copies
    chunked = temporaries(lambda student, teacher: distillation_values(student, teacher, 0.1, 0.05))
    rows_x_k = BATCH * PATCHES * PROTOTYPES * 4
    assert dense > 2 * rows_x_k, dense  # the dense one holds copies of the logits
    assert chunked < dense / 4, (chunked, dense)
    assert chunked < rows_x_k / 2, (chunked, rows_x_k)  # not even one copy
