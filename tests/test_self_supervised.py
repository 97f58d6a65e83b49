"""SigLIP 2's last stage: self-distillation and masked prediction against an EMA teacher.

Values and gradients against plain references written here (and the chunked reduction
against the dense formulas it replaced), the views, the teacher's schedule, micro-batches,
and (slow) a real run whose teacher resumes bit for bit."""

import tomllib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.components import components
from clip_jax.models.distillation import Projected, distillation_values, sinkhorn
from clip_jax.models.naflex import patchify
from clip_jax.models.self_supervised import l2_normalize, random_crops, square_patches
from clip_jax.spec import SpecError, to_toml, validate
from clip_jax.train.teacher import TeacherSchedule, follow, teacher_of
from tests.test_aux_terms import raw_spec

HEAD = {"prototypes": 32, "head_hidden": 32, "bottleneck": 16}
TERMS = [
    {"name": "self_distillation", "local_crops": 2, **HEAD},
    {"name": "masked_prediction", **HEAD},
]


# ------------------------------------------------------------------------- spec
def test_terms_resolve_with_the_papers_defaults_and_read_back_equal():
    spec = validate(raw_spec([{"name": "self_distillation"}, {"name": "masked_prediction"}]))
    distill, masked = spec.loss.aux
    assert (distill.weight, distill.start_fraction, distill.local_crops) == (1.0, 0.8, 8)
    assert (masked.weight, masked.mask_ratio, masked.start_fraction) == (0.25, 0.5, 0.8)
    assert validate(tomllib.loads(to_toml(spec))) == spec


@pytest.mark.parametrize(
    "entries, key",
    [
        ([{"name": "self_distillation", "local_scale": [0.5, 0.1]}], "loss.aux.0"),
        ([{"name": "masked_prediction", "mask_ratio": 1.0}], "loss.aux.0.mask_ratio"),
        ([{"name": "self_distillation", "start_fraction": 1.5}], "loss.aux.0.start_fraction"),
        (
            [
                {"name": "self_distillation", "teacher_momentum": 0.99},
                {"name": "masked_prediction", "teacher_momentum": 0.9},
            ],
            "loss.aux",
        ),
        ([{"name": "self_distilation"}], "loss.aux.0.name"),
    ],
)
def test_a_wrong_teacher_term_names_its_key(entries, key):
    with pytest.raises(SpecError) as caught:
        validate(raw_spec(entries))
    assert caught.value.key == key, caught.value.problems


@pytest.mark.parametrize(
    "change, key",
    [
        ({"loss.aux.0.local_size": 12}, "loss.aux.0.local_size"),  # patch 16
        ({"model.vision.patch_dropout": 0.5}, "model.vision.patch_dropout"),
        ({"preprocess.resize": "naflex"}, "loss.aux.0.name"),
    ],
)
def test_what_the_teacher_terms_cannot_run_with_is_refused_by_validate(change, key):
    raw = raw_spec([{"name": "self_distillation"}, {"name": "captioning"}])
    for dotted, value in change.items():
        *tables, last = dotted.split(".")
        node = raw
        for table in tables:
            node = node[int(table)] if table.isdigit() else node.setdefault(table, {})
        node[last] = value
    with pytest.raises(SpecError) as caught:
        validate(raw)
    assert caught.value.key == key, caught.value.problems


# -------------------------------------------------------------- plain references
def reference_sinkhorn(logits, temperature, iterations=3):
    q = np.exp(logits / temperature)
    q /= q.sum()
    rows, prototypes = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=0, keepdims=True) * prototypes
        q /= q.sum(axis=1, keepdims=True) * rows
    return q * rows


def dense_sinkhorn_targets(logits_NxK, temperature, iterations=3):
    """The targets as the terms first computed them: the whole (N, K) matrix at once."""
    logits = jax.lax.stop_gradient(logits_NxK.astype(jnp.float32)) / temperature
    q = jnp.exp(logits - jnp.max(logits))
    rows, prototypes = q.shape
    q = q / jnp.sum(q)
    for _ in range(iterations):
        q = q / jnp.maximum(jnp.sum(q, axis=0, keepdims=True), 1e-30) / prototypes
        q = q / jnp.maximum(jnp.sum(q, axis=1, keepdims=True), 1e-30) / rows
    return q * rows


def dense_distillation_values(student_NxVxK, teacher_NxK, student_t, teacher_t):
    """The terms' first reduction, on whole (N, V, K) and (N, K) logits."""
    targets_NxK = dense_sinkhorn_targets(teacher_NxK, teacher_t)
    log_p = jax.nn.log_softmax(student_NxVxK.astype(jnp.float32) / student_t, axis=-1)
    cross_entropy = -jnp.sum(targets_NxK[:, None] * log_p, axis=-1)
    agree = jnp.argmax(student_NxVxK, -1) == jnp.argmax(teacher_NxK, -1)[:, None]
    return {"loss": jnp.mean(cross_entropy), "agreement": jnp.mean(agree.astype(jnp.float32))}


def dense_values_of(student: Projected, teacher: Projected, student_t=0.1, teacher_t=0.05):
    """``dense_distillation_values`` on the logits the factored outputs stand for."""
    batch, rows, _ = teacher.features_BxRxE.shape
    teacher_NxK = (teacher.features_BxRxE @ teacher.prototypes_KxE.T).reshape(batch * rows, -1)
    student_NxVxK = (student.features_BxRxE @ student.prototypes_KxE.T).reshape(
        batch * rows, -1, teacher_NxK.shape[-1]
    )
    return dense_distillation_values(student_NxVxK, teacher_NxK, student_t, teacher_t)


def unit(rng, *shape):
    return l2_normalize(jnp.asarray(rng.normal(size=shape), jnp.float32))


def test_sinkhorn_targets_match_a_plain_reference_and_balance_the_prototypes():
    rng = np.random.default_rng(0)
    teacher = Projected(unit(rng, 2, 3, 5), unit(rng, 4, 5))  # 6 rows, 4 prototypes
    plan = sinkhorn(teacher, 0.5, chunk=2)  # 2 + 1 rows of each example
    logits = teacher.features_BxRxE @ teacher.prototypes_KxE.T
    targets = np.asarray(plan.targets(logits, plan.u_BxR, 0.5)).reshape(6, 4)
    expected = reference_sinkhorn(np.asarray(logits, np.float64).reshape(6, 4), 0.5)
    np.testing.assert_allclose(targets, expected, rtol=1e-5)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)  # each row a distribution
    np.testing.assert_allclose(targets.sum(axis=0), 6 / 4, rtol=0.05)  # prototypes shared out


def test_distillation_value_and_gradient_match_a_plain_reference():
    rng = np.random.default_rng(1)
    student_features = unit(rng, 3, 2, 5)  # 2 views per image
    prototypes = unit(rng, 7, 5)
    teacher = Projected(unit(rng, 3, 1, 5), unit(rng, 7, 5))
    t_s, t_t = 0.1, 0.05

    def value(features):
        return distillation_values(Projected(features, prototypes), teacher, t_s, t_t)["loss"]

    loss, grad = jax.jit(jax.value_and_grad(value))(student_features)
    teacher_logits = teacher.features_BxRxE[:, 0] @ teacher.prototypes_KxE.T
    q = reference_sinkhorn(np.asarray(teacher_logits, np.float64), t_t)
    logits = np.asarray(student_features @ prototypes.T, np.float64)
    z = logits / t_s
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected = -(q[:, None] * log_p).sum(-1).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # d/dz of -sum(q log softmax z) = softmax(z) - q, averaged over 3 x 2 rows, / t_s,
    # and back through logits = features @ prototypes.T
    expected_grad = (np.exp(log_p) - q[:, None]) / 6 / t_s @ np.asarray(prototypes, np.float64)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-5)


# Each term's shapes: (batch, teacher rows per example, student rows per teacher row).
SHAPES = {"self_distillation": (3, 1, 5), "masked_prediction": (3, 7, 1)}


@pytest.mark.parametrize("term", SHAPES)
@pytest.mark.parametrize("chunk", [2, None])  # 2: a shorter last chunk; None: the default
def test_the_chunked_reduction_equals_the_dense_one_in_value_and_gradient(term, chunk):
    """The student's raw head outputs (before L2 normalisation) stand in for its
    parameters: the value, agreement and gradients equal the dense formulas' to float32
    rounding, with a row count that the chunk does not divide."""
    batch, rows, views = SHAPES[term]
    rng = np.random.default_rng(5)
    raw = (
        jnp.asarray(rng.normal(size=(batch, rows * views, 8)), jnp.float32),
        jnp.asarray(rng.normal(size=(11, 8)), jnp.float32),
    )
    teacher = Projected(unit(rng, batch, rows, 8), unit(rng, 11, 8))

    def chunked(features, prototypes):
        student = Projected(l2_normalize(features), l2_normalize(prototypes))
        values = distillation_values(student, teacher, 0.1, 0.05, chunk=chunk)
        return values["loss"], values

    def dense(features, prototypes):
        values = dense_values_of(
            Projected(l2_normalize(features), l2_normalize(prototypes)), teacher
        )
        return values["loss"], values

    grad_of = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
    (_, values), grads = grad_of(chunked)(*raw)
    (_, expected), expected_grads = grad_of(dense)(*raw)
    np.testing.assert_allclose(values["loss"], expected["loss"], rtol=1e-5)
    assert float(values["agreement"]) == float(expected["agreement"])
    for grad, reference in zip(grads, expected_grads, strict=True):
        scale = float(jnp.abs(reference).max())
        np.testing.assert_allclose(grad / scale, reference / scale, atol=1e-5)


# --------------------------------------------------------------------- views
def test_each_images_crops_depend_on_its_own_key_only():
    images = np.random.default_rng(2).normal(size=(3, 16, 16, 3)).astype(np.float32)
    images[2] = 0.25  # a constant image crops to the constant
    keys = jax.random.split(jax.random.key(0), 3)
    crop = jax.jit(lambda images, keys: random_crops(images, keys, 2, 8, (0.05, 0.4)))
    crops = crop(jnp.asarray(images), keys)
    assert crops.shape == (6, 8, 8, 3)
    swapped = crop(jnp.asarray(images[[1, 0, 2]]), keys[jnp.array([1, 0, 2])])  # other rows
    np.testing.assert_allclose(swapped[:2], crops[2:4], atol=1e-6)
    assert not np.allclose(crops[0], crops[1])  # two views of one image differ
    np.testing.assert_allclose(crops[4:], 0.25, atol=1e-6)


def test_square_patches_are_naflex_patches():
    image = np.random.default_rng(3).normal(size=(16, 24, 3)).astype(np.float32)
    naflex = square_patches(jnp.asarray(image[None]), 8)
    np.testing.assert_array_equal(naflex.patches_BxNxP[0], patchify(image, 8))
    assert naflex.grid_Bx2.tolist() == [[2, 3]] and bool(naflex.valid_BxN.all())


# ------------------------------------------------------------- EMA teacher
def test_a_bfloat16_students_teacher_is_float32_and_moves():
    schedule = TeacherSchedule(("vision",), start_step=0, momentum=0.996)
    student = {"vision": {"w": jnp.full((4,), 1.0, jnp.bfloat16)}}
    teacher = teacher_of(student, ("vision",))
    assert teacher["vision"]["w"].dtype == jnp.float32
    moved = follow(teacher, {"vision": {"w": jnp.full((4,), 1.5, jnp.bfloat16)}}, 5, schedule)
    np.testing.assert_allclose(moved["vision"]["w"], 1.0 + 0.004 * 0.5, rtol=1e-6)


def test_the_teacher_is_the_student_until_the_start_then_follows_it():
    schedule = TeacherSchedule(("vision",), start_step=3, momentum=0.9)
    teacher = {"vision": {"w": jnp.array([1.0, 2.0])}}
    student = {"vision": {"w": jnp.array([3.0, 6.0])}, "text": {"w": jnp.zeros(2)}}
    copied = follow(teacher, student, jnp.int32(2), schedule)  # step 3 reads the student
    np.testing.assert_array_equal(copied["vision"]["w"], [3.0, 6.0])
    moved = follow(teacher, student, jnp.int32(3), schedule)
    np.testing.assert_allclose(moved["vision"]["w"], [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 6])
    assert set(moved) == {"vision"}  # the text tower has no teacher


# ------------------------------------------------------------------ the objective
@pytest.fixture(scope="module")
def taught():
    raw = raw_spec(TERMS)
    raw["model"]["vision"]["patch_size"] = 8
    raw["train"]["steps"] = 10
    comps = components(validate(raw))
    size = comps.spec.model.vision.image_size
    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.normal(size=(8, size, size, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, 64, size=(8, 8)), jnp.int32)
    params = nn.meta.unbox(jax.jit(comps.model.init)(jax.random.key(0), images, tokens))
    params = params["params"]
    # A teacher a little away from the student, as after some EMA steps.
    noise = lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape)  # noqa: E731
    teacher = jax.tree.map(noise, teacher_of(params, comps.teacher.keys))
    extras = {"teacher": teacher, "view_keys": jax.random.split(jax.random.key(9), 8)}
    grad_fn = jax.jit(jax.value_and_grad(comps.objective(), has_aux=True))
    return comps, params, images, tokens, extras, grad_fn


def test_the_schedule_starts_at_the_terms_fraction_and_stages_the_run():
    terms = [TERMS[0], {**TERMS[1], "start_fraction": 0.9}, {"name": "captioning"}]
    raw = raw_spec(terms)
    raw["train"]["steps"] = 10
    comps = components(validate(raw))
    assert comps.teacher.start_step == 8 and comps.teacher.momentum == 0.996
    assert comps.teacher.keys == ("vision", "aux_self_distillation", "aux_masked_prediction")
    stages = comps.objective_stages()
    assert [start for start, _ in stages] == [0, 8, 9]  # each start begins a stage
    assert [objective.example_inputs for _, objective in stages] == [(), *[("view_keys",)] * 2]


@pytest.mark.slow  # compiles the model
def test_before_the_start_the_terms_add_nothing_and_train_nothing(taught):
    comps, params, images, tokens, extras, grad_fn = taught
    before = comps.objective_stages()[0][1]  # no teacher read: no teacher inputs
    (loss, metrics), grads = jax.jit(jax.value_and_grad(before, has_aux=True))(
        params, images, tokens, None, jax.random.key(2)
    )
    assert float(metrics["loss/self_distillation"]) == float(metrics["loss/masked_prediction"]) == 0
    np.testing.assert_allclose(loss, metrics["loss/contrastive"])
    for name in ("aux_self_distillation", "aux_masked_prediction"):
        assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads[name])), name


@pytest.mark.slow  # compiles the model twice more
def test_after_the_start_the_total_adds_each_weighted_term_computed_by_hand(taught):
    comps, params, images, tokens, extras, grad_fn = taught
    (loss, metrics), grads = grad_fn(params, images, tokens, None, jax.random.key(2), **extras)
    model, keys = comps.model, extras["view_keys"]
    merged = {**params, **extras["teacher"]}
    names = ("self_distillation", "masked_prediction")
    targets = model.apply({"params": merged}, images, keys, names, method="teacher_targets")
    out = model.apply(
        {"params": params},
        images,
        tokens,
        train=True,
        aux=True,
        targets=targets,
        view_keys_B=keys,
        rngs={"dropout": jax.random.key(2)},
    )
    img, txt, log_scale, bias, outputs = out
    contrastive = comps.loss.fn(img, txt, log_scale, bias)
    # The heads' outputs stay factored: features by example (E = 16), prototypes (K = 32)
    # as one row.
    sd = outputs["self_distillation"]  # student (B, 2 views, E), teacher (B, 1, E)
    assert sd["student"].shape == (8, 2, 16) and sd["teacher"].shape == (8, 1, 16)
    assert sd["student_prototypes"].shape == sd["teacher_prototypes"].shape == (1, 32, 16)
    mp = outputs["masked_prediction"]  # 8 of 16 patches masked: (B, 8, E) each
    assert mp["student"].shape == mp["teacher"].shape == (8, 8, 16)

    def hand(outputs, rows, views):  # the same cross-entropy, written out with numpy
        logits = {
            role: np.asarray(outputs[role], np.float64)
            @ np.asarray(outputs[f"{role}_prototypes"][0], np.float64).T
            for role in ("student", "teacher")
        }
        q = reference_sinkhorn(logits["teacher"].reshape(rows, 32), 0.05)
        z = logits["student"].reshape(rows, views, 32) / 0.1
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -(q[:, None] * log_p).sum(-1).mean()

    distill = hand(sd, 8, 2)
    masked = hand(mp, 64, 1)
    np.testing.assert_allclose(metrics["loss/self_distillation"], distill, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss/masked_prediction"], masked, rtol=1e-4)
    np.testing.assert_allclose(loss, contrastive + distill + 0.25 * masked, rtol=1e-4)
    assert float(jnp.abs(grads["aux_masked_prediction"]["mask_token"]).sum()) > 0
    assert float(jnp.abs(grads["aux_self_distillation"]["head"]["fc1"]["kernel"]).sum()) > 0


@pytest.mark.slow  # compiles the model over micro-batches
def test_micro_batches_give_the_full_batch_terms_and_gradients(taught):
    from clip_jax.train.microbatch import cached_value_and_grad

    comps, params, images, tokens, extras, grad_fn = taught
    inputs = (params, images, tokens, None, jax.random.key(2))
    (loss, metrics), grads = grad_fn(*inputs, **extras)
    micro = jax.jit(cached_value_and_grad(comps.objective(), 2))
    (loss2, metrics2), grads2 = micro(*inputs, **extras)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    for name in ("loss/self_distillation", "loss/masked_prediction"):
        np.testing.assert_allclose(metrics2[name], metrics[name], rtol=1e-5)
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-5)


# ----------------------------------------------------------------- a real run
@pytest.mark.slow
def test_a_run_logs_every_term_and_its_teacher_resumes_bit_for_bit(small_run, tmp_path):
    """A run warm-started from a plain one (the terms' heads start fresh): 8 steps,
    terms on from step 4, checkpoints at 4 and 8; the checkpoint at 8 is removed and the
    run resumed from 4: the same losses and the same teacher at 8."""
    import shutil

    from clip_jax.run_folder import RunFolder
    from clip_jax.spec import load_spec
    from clip_jax.train.checkpoint import Checkpoints
    from clip_jax.train.state import state_shardings
    from clip_jax.train.trainer import train
    from tests.conftest import QUICKSTART

    terms = ", ".join(
        "{" + ", ".join(f"{k} = {v!r}".replace("'", '"') for k, v in term.items()) + "}"
        for term in [{**t, "start_fraction": 0.5} for t in TERMS]
    )
    steps = [
        "train.steps=8",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.batch_size=16",
    ]
    plain = [*small_run, "train.steps=1", "train.batch_size=16", f"run.output_dir={tmp_path}/a"]
    train(load_spec(QUICKSTART, plain))
    warm = f"train.init_from={tmp_path}/a"
    spec = load_spec(QUICKSTART, small_run + [f"loss.aux=[{terms}]", *steps, warm])
    train(spec)
    folder = RunFolder(spec.run.output_dir)
    fresh = "(aux_masked_prediction/, aux_self_distillation/ initialised fresh)"
    assert fresh in (folder.path / "run.log").read_text()
    records = [r for r in folder.metrics() if r["split"] == "train"]
    assert {"loss/self_distillation", "loss/masked_prediction"} <= set(records[-1])
    before = [r["loss/self_distillation"] for r in records if r["step"] <= 4]
    after = [r["loss/self_distillation"] for r in records if r["step"] > 4]
    assert before == [0.0] * 4 and all(value > 0 for value in after)

    comps = components(spec)
    tx, _ = comps.optimizer()
    _, abstract, _ = state_shardings(comps.model, tx, comps.layout, spec)

    def saved(step):
        checkpoints = Checkpoints(folder.checkpoints, 3, 1)
        state = checkpoints.restore(step, abstract)[0]
        checkpoints.close()
        return {k: np.asarray(v) for k, v in flat(state["teacher"]).items()}, state

    teacher_8, state_8 = saved(8)
    teacher_4, _ = saved(4)
    vision_8 = flat(state_8["params"]["vision"])
    moved = [k for k in teacher_8 if k.startswith("vision/") and k in teacher_4]
    assert any(not np.array_equal(teacher_8[k], teacher_4[k]) for k in moved)
    # The EMA lags the student: after 4 steps of momentum 0.996 it is not the student.
    assert any(not np.array_equal(teacher_8[f"vision/{k}"], vision_8[k]) for k in vision_8)

    shutil.rmtree(folder.checkpoints / "8")
    train(spec)  # resumes from 4
    resumed = [r for r in folder.metrics() if r["split"] == "train"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]
    again, _ = saved(8)
    for name, value in teacher_8.items():
        assert again[name].tobytes() == value.tobytes(), name


def flat(tree) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
