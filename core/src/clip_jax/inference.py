"""Using a trained model: ``clip_jax.load(run_dir)`` -> encode images and texts, classify.

Everything is read from the run folder (resolved spec, tokenizer, latest checkpoint),
so a run folder is all one needs to use or evaluate a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clip_jax import spec as spec_lib
from clip_jax import storage
from clip_jax.components import Components, components
from clip_jax.data.naflex import budget as naflex_budget
from clip_jax.errors import UserError
from clip_jax.run_folder import RunFolder


@dataclass
class LoadedClip:
    comps: Components
    params: Any
    tokenizer: Any
    step: int

    def __post_init__(self) -> None:
        import jax

        from clip_jax.evaluate import padded_encoder
        from clip_jax.train.state import make_encoders

        self.params = jax.device_put(self.params)  # once, not at every call
        self._captioners: dict = {}  # max_length -> greedy decoder, made on first use
        images_fn, texts_fn = make_encoders(self.comps.model)
        size = self.comps.spec.eval.batch_size
        self._images = padded_encoder(images_fn, self.params, size)
        self._tokens = padded_encoder(texts_fn, self.params, size)

    @property
    def spec(self) -> spec_lib.RunSpec:
        return self.comps.spec

    @property
    def temperature(self) -> float:
        """The learned logit scale (exp of the log-scale parameter)."""
        return float(np.exp(np.asarray(self.params["logit_scale"])))

    def preprocess(self, images: Any, max_patches: int | None = None) -> Any:
        """Model inputs (BxHxWx3 float32) from file paths, PIL images or HxWx3 uint8
        arrays, with the model's own preprocessing; a float BxHxWx3 array is taken as
        already preprocessed (what the data pipeline yields). A NaFlex run's inputs are
        ``NaflexImages``: each image at its own aspect ratio, in at most ``max_patches``
        patches (default the run's ``preprocess.max_patches``)."""
        from clip_jax.data.images import naflex_images, preprocess
        from clip_jax.models.naflex import NaflexImages, pad_batch

        pre, vision = self.spec.preprocess, self.spec.model.vision
        naflex = pre.resize == "naflex"
        if max_patches is not None and not naflex:
            raise UserError("max_patches is for NaFlex runs (preprocess.resize = 'naflex')")
        if isinstance(images, NaflexImages):
            return images
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype != np.uint8:
            if naflex:  # preprocessed pixels: as many whole patches as they hold
                side = vision.patch_size
                count = (images.shape[1] // side) * (images.shape[2] // side)
                return pad_batch(list(images.astype(np.float32)), side, count)
            return images.astype(np.float32)
        if (
            isinstance(images, np.ndarray)
            and images.ndim == 3
            or isinstance(images, str | Path)
            or not isinstance(images, Sequence | np.ndarray)
        ):
            images = [images]
        if naflex:
            budget = max_patches or naflex_budget(pre, vision.image_size, vision.patch_size)
            return naflex_images(list(images), vision.patch_size, budget, pre)
        return preprocess(list(images), vision.image_size, pre)

    def encode_images(self, images: Any, max_patches: int | None = None) -> np.ndarray:
        """Unit-norm embeddings of images: paths, PIL images, uint8 arrays, or a
        preprocessed float batch. ``max_patches``: a NaFlex run's patch budget, for
        finer (more) or cheaper (fewer) patches than it trained with."""
        return self._images(self.preprocess(images, max_patches))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._tokens(self.tokenizer(list(texts)))

    def classify(
        self,
        images: Any,
        classes: Sequence[str],
        templates: Sequence[str] = ("a photo of a {}.",),
    ) -> np.ndarray:
        """Zero-shot class probabilities, images x classes (softmax at the model's own
        learned temperature). The default prompt is ``clipctl predict``'s and ``eval
        --data``'s."""
        from clip_jax.evaluate import class_embeddings

        class_emb_CxD = class_embeddings(self.encode_texts, classes, templates)
        logits = self.encode_images(images) @ class_emb_CxD.T * self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=1, keepdims=True)

    def caption(self, images: Any, max_length: int | None = None) -> list[str]:
        """Greedy captions from a run trained with the ``captioning`` term
        (``[[loss.aux]]``): images as ``encode_images`` takes them."""
        from clip_jax.evaluate import padded_encoder
        from clip_jax.models.captioning import greedy_captioner

        if max_length not in self._captioners:
            decode = greedy_captioner(self.comps.model, self.tokenizer, max_length)
            if decode is None:
                raise UserError(
                    "this model has no captioning decoder: train it with a [[loss.aux]] "
                    'term name = "captioning"'
                )
            size = self.spec.eval.batch_size
            self._captioners[max_length] = padded_encoder(decode, self.params, size)
        return self.tokenizer.decode(self._captioners[max_length](self.preprocess(images)))


def load(ref: str | Path, step: int | None = None, image_size: int | None = None) -> LoadedClip:
    """Load a run folder's latest (or given) checkpoint, or published weights (``hf:PATH``).

    ``image_size`` other than the trained one resamples the position embeddings.
    """
    from clip_jax.pretrained import parse_ref
    from clip_jax.train.warm_start import params_of_run

    if parse_ref(ref):
        return _load_pretrained(str(ref), image_size)
    run_dir = ref
    params, trained, step = params_of_run(run_dir, step)
    if image_size is None or image_size == trained.model.vision.image_size:
        comps = components(trained)
    else:
        params, comps = _resized(params, trained, image_size)
    with storage.local_copy(RunFolder(run_dir).tokenizer) as saved:
        tokenizer = comps.tokenizer(saved=saved)
    return LoadedClip(comps, params, tokenizer, step)


def _load_pretrained(ref: str, image_size: int | None) -> LoadedClip:
    """A published checkpoint, with the model, tokenizer and preprocessing its files describe."""
    import flax.linen as nn

    from clip_jax import pretrained
    from clip_jax.train.state import param_shapes
    from clip_jax.train.warm_start import class_token_rows, fit_params

    _, path = pretrained.parse_ref(ref)
    if not pretrained.checkpoint_exists(path):  # said of the model, not of a spec key
        raise UserError(f"{ref}: {path} does not exist")
    raw: dict[str, Any] = {"train": {"init_from": ref}}
    if image_size is not None:
        raw["model"] = {"vision": {"image_size": image_size}}
    spec = spec_lib.validate(raw)
    comps = components(spec)
    source, names = pretrained.read_params(ref, spec)
    shapes = nn.unbox(param_shapes(comps.model, spec))
    params = fit_params(source, shapes, class_token_rows(spec), names)
    return LoadedClip(comps, params, comps.tokenizer(), step=0)


def _resized(params: Any, trained: spec_lib.RunSpec, image_size: int) -> tuple[Any, Components]:
    """The parameters fitted to the same model at another image size."""
    import flax.linen as nn

    from clip_jax.train.state import param_shapes
    from clip_jax.train.warm_start import class_token_rows, fit_params

    raw = trained.model_dump(mode="json", exclude_none=True)
    spec = spec_lib.validate(
        spec_lib.apply_overrides(raw, [f"model.vision.image_size={image_size}"]),
        pretrained=False,
    )
    comps = components(spec)
    shapes = nn.unbox(param_shapes(comps.model, spec))  # no mesh: the run's may not fit here
    return fit_params(params, shapes, class_token_rows(spec)), comps


def evaluate_run(
    model_ref: str | Path,
    step: int | None = None,
    data: str | None = None,
    classes: str | None = None,
    linear_probe: bool = False,
    probe_data: str | None = None,
    image_key: str | None = None,
    caption_key: str | None = None,
    label_key: str | None = None,
    max_examples: int | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder's checkpoint (or ``hf:PATH`` weights) and, for a run folder,
    append the results to its metrics.jsonl.

    With no options: the run's validation split, as during training
    (``train.trainer.run_evaluation``, NaFlex budgets included). ``data`` / ``classes`` /
    ``linear_probe`` / keys / ``max_examples`` evaluate on any labelled tfrecord set, or on
    the run's split with those changes (see ``clip_jax.eval_sets``): options add to what
    is measured, so a head's accuracy and a captioning run's caption metrics are still
    reported there (on labels the head can score, on sets with captions). ``data``,
    ``classes`` and ``probe_data`` are checked before the model loads.
    """
    from clip_jax.pretrained import parse_ref

    published = parse_ref(model_ref) is not None
    if published and not data:
        raise UserError(f"{model_ref} has no validation split of its own: pass --data GLOB")
    if linear_probe and (published or data) and not probe_data:
        raise UserError(
            "--linear-probe on --data (or published weights) needs --probe-data: the shards "
            "the probe trains on, read with the same keys"
        )
    custom = data or classes or linear_probe or image_key or label_key or caption_key
    if custom or max_examples:
        from clip_jax.eval_sets import evaluate_model, read_inputs, run_eval_set

        inputs = read_inputs(data, classes, probe_data if linear_probe else None)
        model = load(model_ref, step)
        eval_set = run_eval_set(model, inputs, image_key, caption_key, label_key)
        probe_files: list[str] = []
        if linear_probe:
            try:
                probe_files = inputs.probe_files or model.comps.data.train_files
            except FileNotFoundError as exc:
                raise UserError(f"--probe-data: {exc}") from None
        limit = max_examples or model.spec.eval.max_examples
        require_labels = bool(classes or label_key)
        results = evaluate_model(model, eval_set, probe_files, limit, require_labels=require_labels)
        split = f"eval:{eval_set.name}"
    else:
        from clip_jax.models.captioning import greedy_captioner
        from clip_jax.train.state import make_encoders
        from clip_jax.train.trainer import run_evaluation

        model = load(model_ref, step)
        comps, tokenizer = model.comps, model.tokenizer
        captioner = greedy_captioner(comps.model, tokenizer)
        encoders = make_encoders(comps.model)
        results = run_evaluation(comps, model.params, tokenizer, encoders, captioner)
        split = "eval:validation"
    results = {"step": model.step, **results}
    if not published:
        import time

        RunFolder(model_ref).append_metrics({**results, "split": split, "time": time.time()})
    return results
