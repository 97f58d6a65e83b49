"""The EMA teacher of SigLIP 2's last stage, kept in the train state.

The teacher is ``state["teacher"]``: a copy of the parameters under ``keys`` (the image
tower and the heads of the terms that learn from it), checkpointed with the rest of
the state, so a resumed run continues with the very same teacher. After every update
it follows the student: until the first term's start it *is* the student (momentum
0), so the paper's "teacher initialised from the student when the terms start" needs
no special step; from then on ``teacher = m * teacher + (1 - m) * student``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class TeacherSchedule:
    keys: tuple[str, ...]  # top-level parameter collections the teacher copies
    start_step: int  # the first step whose loss reads the teacher
    momentum: float


def teacher_keys(model: Any) -> tuple[str, ...]:
    """The parameters the teacher copies: the image tower and the heads of the terms
    that learn from it (``aux_<name>``); () when no term does."""
    taught = [
        name
        for name, term in (getattr(model, "aux", None) or {}).items()
        if getattr(term, "learns_from_teacher", False)
    ]
    return ("vision", *(f"aux_{name}" for name in taught)) if taught else ()


def teacher_schedule(model: Any, terms: Sequence[Any]) -> TeacherSchedule | None:
    """The schedule of the run's teacher, from its terms (``AuxTerm``); None if none."""
    taught = [term for term in terms if term.teacher]
    if not taught:
        return None
    start = min(term.start_step for term in taught)
    return TeacherSchedule(teacher_keys(model), start, taught[0].teacher_momentum)


def teacher_of(params: Any, keys: Sequence[str]) -> dict[str, Any]:
    """The teacher at initialisation: the student's parameters under ``keys``, in
    float32 whatever ``param_dtype`` is: an EMA step of 1 - 0.996 is below bfloat16's
    resolution, and a bfloat16 teacher would never move."""
    return {key: jax.tree.map(lambda x: x.astype(jnp.float32), params[key]) for key in keys}


def follow(teacher: Any, params: Any, step: jax.Array, schedule: TeacherSchedule) -> Any:
    """The teacher after the update of ``step`` produced ``params``: the student itself
    while the next step is not past the start, the moving average after."""
    copying = step + 1 <= schedule.start_step
    m = schedule.momentum

    def average(old: jax.Array, new: jax.Array) -> jax.Array:  # float32 teacher
        new = new.astype(jnp.float32)
        return jnp.where(copying, new, m * old + (1.0 - m) * new)

    return {key: jax.tree.map(average, teacher[key], params[key]) for key in schedule.keys}
