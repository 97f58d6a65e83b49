"""Tokenizers: Hugging Face ``tokenizers`` byte-level BPE, loaded or trained on captions.

Conventions the text tower relies on: texts are padded with ``pad_id`` (0, the
tower's ``pad_id``, unless a loaded tokenizer says otherwise), every sequence is
``<start_of_text> ... <end_of_text>`` (the tokenizer.json's post-processor adds them) and
is truncated so the end token survives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from clip_jax.errors import PathError, UserError
from clip_jax.schemas import BpeTokenizerOptions

PAD, BOS, EOS = "<pad>", "<start_of_text>", "<end_of_text>"


class TextTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` to give fixed-length int32 arrays."""

    def __init__(self, tokenizer: Tokenizer, context_length: int, pad_id: int = 0):
        self.tokenizer = tokenizer
        self.context_length = context_length
        if pad_id >= tokenizer.get_vocab_size():
            raise UserError(
                f"tokenizer.pad_id: {pad_id} is not in the tokenizer's vocabulary "
                f"({tokenizer.get_vocab_size()} tokens)"
            )
        pad_token = tokenizer.id_to_token(pad_id) or PAD
        tokenizer.enable_truncation(context_length)
        tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=context_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(texts))
        return np.asarray([e.ids for e in encodings], dtype=np.int32)

    @property
    def eos_id(self) -> int:
        """The end-of-text id (what ends a generated caption)."""
        eos = self.tokenizer.token_to_id(EOS)
        return eos if eos is not None else self.tokenizer.padding["pad_id"]

    def decode(self, tokens_BxL: np.ndarray) -> list[str]:
        """Texts from token ids, special tokens (start, end, padding) left out, and
        bytes that form no character (a generated caption may stop inside one, and
        byte-level decoding shows them as U+FFFD)."""
        rows = [[int(t) for t in row] for row in np.asarray(tokens_BxL)]
        return [text.replace("\ufffd", "").strip() for text in self.tokenizer.decode_batch(rows)]

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS)), (EOS, tokenizer.token_to_id(EOS))],
    )
    return tokenizer


def bpe_tokenizer(
    options: BpeTokenizerOptions,
    context_length: int,
    saved: str | Path | None = None,
    captions: Iterable[str] = (),
) -> TextTokenizer:
    """Factory registered as tokenizer ``bpe``.

    Loads ``saved`` (the run folder's copy) first, then ``options.path``; otherwise
    trains on ``captions``.
    """
    for path in (saved, options.path):
        if path and Path(path).exists():
            try:
                loaded = Tokenizer.from_file(str(path))
            except Exception as exc:  # the tokenizers library raises its own types
                raise UserError(f"tokenizer.path: {path} is not a tokenizer.json ({exc})") from None
            return TextTokenizer(loaded, context_length, options.pad_id)
    if options.path:
        raise PathError(
            f"{options.path} does not exist: give a tokenizer.json, or leave tokenizer.path "
            "out to train one on the captions",
            key="tokenizer.path",
        )
    trained = train_bpe(captions, options.vocab_size, options.lowercase)
    return TextTokenizer(trained, context_length, options.pad_id)
