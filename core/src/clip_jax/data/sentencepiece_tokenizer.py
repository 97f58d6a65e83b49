"""Tokenizer ``sentencepiece``: a SentencePiece model, tokenizing as SigLIP does.

It reproduces ``transformers.SiglipTokenizer`` called with ``padding="max_length",
truncation=True``: the text is lowercased, its ASCII punctuation dropped and its
whitespace collapsed (big_vision's canonicalisation), literal ``</s>`` / ``<unk>`` are
read as those tokens, the ids are truncated so the end-of-sequence id survives, and
the rest is padded with the end-of-sequence id (SigLIP's padding).

A run folder keeps it as ``tokenizer.json``: a JSON document with the serialized model
proto (base64) and the options, read back by the factory when given ``saved=``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from clip_jax.errors import PathError, UserError
from clip_jax.schemas import SentencePieceTokenizerOptions

FORMAT = "clip_jax.sentencepiece"
SPIECE_UNDERLINE = "\u2581"  # "▁": SentencePiece's word-boundary mark
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str, lowercase: bool = True, punctuation: bool = True) -> str:
    """big_vision's / SiglipTokenizer's text canonicalisation."""
    if lowercase:
        text = text.lower()
    if punctuation:
        text = text.translate(_PUNCTUATION)
        text = re.sub(r"\s+", " ", text).strip()
    return text


class SentencePieceTokenizer:
    """Fixed-length int32 ids from a SentencePiece model (same interface as TextTokenizer)."""

    def __init__(
        self,
        model_proto: bytes,
        context_length: int,
        *,
        lowercase: bool = True,
        canonicalize: bool = True,
        pad_id: int | None = None,
        add_eos: bool = True,
    ):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(self.model_proto)
        self.context_length = context_length
        self.lowercase = lowercase
        self.canonicalize = canonicalize
        self.add_eos = add_eos
        self.eos_id = self.sp.eos_id()
        if add_eos and self.eos_id < 0:
            raise UserError("tokenizer.add_eos: the SentencePiece model has no end-of-sequence id")
        if pad_id is None:
            pad_id = self.eos_id if self.eos_id >= 0 else self.sp.pad_id()
            if pad_id < 0:
                raise UserError(
                    "tokenizer.pad_id: the SentencePiece model has neither an end-of-sequence "
                    "nor a padding id; set tokenizer.pad_id"
                )
        if not 0 <= pad_id < self.vocab_size:
            raise UserError(f"tokenizer.pad_id: {pad_id} is not an id of this model")
        self.pad_id = pad_id
        # SiglipTokenizer's special tokens (eos, unk; its pad is eos): split out of the
        # text before it is canonicalised, their spaces either side stripped.
        self._unk = self.sp.id_to_piece(self.sp.unk_id())
        self._unk_length = len(self.sp.encode(self._unk, out_type=str))
        specials = [self.sp.id_to_piece(i) for i in (self.eos_id, self.sp.unk_id()) if i >= 0]
        self._specials = set(specials)
        by_length = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, by_length)) + ")")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def options(self) -> dict[str, Any]:
        return {
            "lowercase": self.lowercase,
            "canonicalize": self.canonicalize,
            "pad_id": self.pad_id,
            "add_eos": self.add_eos,
        }

    def _chunks(self, text: str) -> list[str]:
        """SiglipTokenizer.tokenize up to the SentencePiece call: the text split on
        special tokens, each neighbour of one stripped of its spaces."""
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        chunks = [c for c in self._split.split(text) if c]
        for i, chunk in enumerate(chunks):
            if chunk in self._specials:
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
                if i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
        return [c for c in chunks if c]

    def pieces(self, texts: Sequence[str]) -> list[list[str]]:
        """Each text's pieces, before the end-of-sequence id, truncation and padding."""
        chunked = [self._chunks(t) for t in texts]
        plain = [
            self._unk + canonicalize(c, self.lowercase, self.canonicalize)
            for chunks in chunked
            for c in chunks
            if c not in self._specials
        ]
        encoded = iter(self.sp.encode(plain, out_type=str) if plain else [])
        result = []
        for chunks in chunked:
            tokens: list[str] = []
            for chunk in chunks:
                if chunk in self._specials:
                    tokens.append(chunk)
                else:
                    # the unk prefix keeps a leading "▁" a word boundary, then is dropped
                    pieces = next(encoded)
                    if len(pieces) >= self._unk_length:
                        pieces = pieces[self._unk_length :]
                    tokens.extend(pieces)
            if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._specials:
                tokens = tokens[1:]
            result.append(tokens)
        return result

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        length = self.context_length
        out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        for row, tokens in enumerate(self.pieces(list(texts))):
            ids = list(self.sp.piece_to_id(tokens)) if tokens else []
            if self.add_eos:
                ids = ids[: length - 1]
                if not ids or ids[-1] != self.eos_id:  # as SiglipTokenizer: no second eos
                    ids.append(self.eos_id)
            else:
                ids = ids[:length]
            out[row, : len(ids)] = ids
        return out

    def decode(self, tokens_BxL: np.ndarray) -> list[str]:
        """Texts from token ids, up to the end-of-sequence id."""
        texts = []
        for row in np.asarray(tokens_BxL).tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            texts.append(self.sp.decode([t for t in row if t != self.pad_id]))
        return texts

    def save(self, path: str | Path) -> None:
        document = {
            "format": FORMAT,
            "version": 1,
            "options": self.options(),
            "model_proto": base64.b64encode(self.model_proto).decode("ascii"),
        }
        Path(path).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def _read_saved(path: Path, what: str) -> tuple[bytes, dict[str, Any]]:
    """(model proto, options) of a file written by ``SentencePieceTokenizer.save``."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} document")
        proto = base64.b64decode(document["model_proto"], validate=True)
        options = document.get("options", {})
        if not isinstance(options, dict):
            raise ValueError("options is not a table")
        known = {"lowercase", "canonicalize", "pad_id", "add_eos"}
        checked = SentencePieceTokenizerOptions(
            path=str(path), **{k: v for k, v in options.items() if k in known}
        )  # a pydantic ValidationError is a ValueError
        return proto, checked.model_dump(include=known)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise UserError(f"{what}: {path} is not a saved sentencepiece tokenizer ({exc})") from None


def _is_saved(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(1) == b"{"  # a model proto is binary protobuf, never JSON


def sentencepiece_tokenizer(
    options: SentencePieceTokenizerOptions,
    context_length: int,
    saved: str | Path | None = None,
    captions: Iterable[str] = (),
) -> SentencePieceTokenizer:
    """Factory registered as tokenizer ``sentencepiece``.

    Loads ``saved`` (the run folder's copy, which keeps its own options) if it exists,
    else the model at ``options.path`` (a ``.model`` file, or a copy saved by a run).
    ``captions`` are not used: the model is never trained here.
    """
    del captions
    if saved is not None and Path(saved).exists():
        proto, kept = _read_saved(Path(saved), "tokenizer")
        return _build(proto, context_length, kept, f"tokenizer: {saved}")
    path = Path(options.path).expanduser()
    settings = {
        "lowercase": options.lowercase,
        "canonicalize": options.canonicalize,
        "pad_id": options.pad_id,
        "add_eos": options.add_eos,
    }
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise PathError(
            f"{options.path} {what}: give the SentencePiece .model file (e.g. a SigLIP "
            "folder's spiece.model)",
            key="tokenizer.path",
        )
    try:
        if _is_saved(path):
            proto, settings = _read_saved(path, "tokenizer.path")
        else:
            proto = path.read_bytes()
    except OSError as exc:
        raise UserError(f"tokenizer.path: cannot read {options.path} ({exc})") from None
    return _build(proto, context_length, settings, f"tokenizer.path: {options.path}")


def _build(
    proto: bytes, context_length: int, settings: dict[str, Any], where: str
) -> SentencePieceTokenizer:
    try:
        return SentencePieceTokenizer(proto, context_length, **settings)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{where} is not a SentencePiece model ({exc})") from None
