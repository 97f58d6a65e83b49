"""Tokenizer ``sentencepiece``: ids exactly as transformers.SiglipTokenizer gives them."""

import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from clip_jax.data.sentencepiece_tokenizer import (
    SentencePieceTokenizer,
    canonicalize,
    sentencepiece_tokenizer,
)
from clip_jax.errors import UserError
from clip_jax.plugins import get_registry
from clip_jax.schemas import SentencePieceTokenizerOptions
from clip_jax.spec import SpecError, validate

# SigLIP's spiece.model (T5's layout): <pad> 0, </s> 1, <unk> 2, no <s>
PAD, EOS, UNK = 0, 1, 2

TEXTS = [
    "a small red circle",
    "A Small RED Circle!",
    "a picture of a large blue square, in the top-left corner.",
    "hello,   world...  (and) [more]   punctuation?!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nhere",
    "Zürich CAFÉ naïve ÅNGSTRÖM İstanbul",
    "’curly’ “quotes” — dashes",
    "🙂 emoji and xyzzy unknown qqq",
    "1,000.5% off {braces} don't",
    "",
    " ",
    "▁",
    "▁▁a a▁b",
    "the dog</s>",
    "</s>",
    "</s> the cat",
    "  </s>  ",
    "x</s>y a</s></s>b",
    "a <unk> b <unk>",
    "</S> <UNK>",
    "green " * 40,
    "a picture of a " * 12 + "triangle",
]


def made_up_captions(count: int = 400) -> list[str]:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ra", "su", "ten", "vor", "bel", "dan", "fi", "go", "hu"]
    common = ["a", "the", "of", "in", "on", "with", "and", "small", "large", "red", "green"]
    common += ["blue", "yellow", "circle", "square", "triangle", "photo", "picture", "top"]
    common += ["left", "right", "bottom", "corner", "dog", "cat"]
    made = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(200)]
    words = common + made
    return [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(count)]


def train_model(directory, vocab_size: int = 200):
    """A unigram model with SigLIP's special ids (no bos), trained in a few ms."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(made_up_captions()),
        model_writer=out,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=PAD,
        eos_id=EOS,
        unk_id=UNK,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = directory / "spiece.model"
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A ~200-piece unigram model with SigLIP's special ids, trained in a few ms."""
    return train_model(tmp_path_factory.mktemp("spm"))


def load(model_file, context_length=16, **options) -> SentencePieceTokenizer:
    opts = SentencePieceTokenizerOptions(path=str(model_file), **options)
    return sentencepiece_tokenizer(opts, context_length)


def test_model_has_siglip_ids(model_file):
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (PAD, EOS, UNK, -1)
    assert 150 <= sp.get_piece_size() <= 200


@pytest.mark.filterwarnings("ignore:This sequence already has")  # texts ending in </s>
@pytest.mark.parametrize("context_length", [1, 2, 8, 16, 64])
def test_matches_transformers_siglip_tokenizer(model_file, context_length):
    try:
        from transformers import SiglipTokenizer
    except ImportError as exc:  # transformers, or a backend it needs, is missing
        pytest.skip(f"transformers.SiglipTokenizer is not importable: {exc}")
    reference = SiglipTokenizer(vocab_file=str(model_file))
    expected = reference(TEXTS, padding="max_length", max_length=context_length, truncation=True)[
        "input_ids"
    ]
    ours = load(model_file, context_length)(TEXTS)
    assert ours.shape == (len(TEXTS), context_length)
    for text, got, want in zip(TEXTS, ours.tolist(), expected, strict=True):
        assert got == want, text
    assert reference.pad_token_id == EOS  # SigLIP pads with </s>


def test_framing_truncation_and_padding(model_file):
    tok = load(model_file, 16)
    assert tok.vocab_size == spm.SentencePieceProcessor(model_file=str(model_file)).vocab_size()
    ids = tok(["a small red circle", "green " * 40, ""])
    assert ids.dtype == np.int32 and ids.shape == (3, 16)
    short = ids[0].tolist()
    n = short.index(EOS)
    assert 1 < n < 15 and EOS not in short[:n] and PAD not in short
    assert short[n:] == [EOS] * (16 - n)  # padded with the eos id, as SigLIP
    assert ids[1, -1] == EOS and EOS not in ids[1, :-1]  # truncated, eos kept
    assert ids[2].tolist() == [EOS] * 16
    # the truncated text is the start of the full one
    full = load(model_file, 64)(["green " * 40])[0]
    assert ids[1, :15].tolist() == full[:15].tolist()


def test_options(model_file):
    text = ["A Small, RED circle!"]
    base = load(model_file, 12)(text)[0].tolist()
    padded = load(model_file, 12, pad_id=PAD)(text)[0].tolist()
    n = base.index(EOS) + 1
    assert padded[:n] == base[:n] and padded[n:] == [PAD] * (12 - n)
    no_eos = load(model_file, 12, add_eos=False, pad_id=PAD)(text)[0].tolist()
    assert no_eos == base[: n - 1] + [PAD] * (13 - n)
    long = load(model_file, 4, add_eos=False)(["green " * 40])[0].tolist()
    assert EOS not in long and long == load(model_file, 64)(["green " * 40])[0, :4].tolist()
    assert load(model_file, 12, lowercase=False)(text)[0].tolist() != base
    assert load(model_file, 12, canonicalize=False)(text)[0].tolist() != base
    assert canonicalize("  A,  B!\tc ") == "a b c"
    assert canonicalize("A, B", lowercase=False) == "A B"
    assert canonicalize("A,  b", punctuation=False) == "a,  b"
    with pytest.raises(UserError, match="tokenizer.pad_id"):
        load(model_file, 12, pad_id=10_000)


def test_save_reload_round_trip(tmp_path, model_file):
    tok = load(model_file, 16, pad_id=PAD)
    saved = tmp_path / "tokenizer.json"
    tok.save(saved)
    document = json.loads(saved.read_text())
    assert document["format"] == "clip_jax.sentencepiece"
    assert document["options"]["pad_id"] == PAD
    # the saved copy wins: its model and options, whatever the spec says now
    other = SentencePieceTokenizerOptions(path=str(tmp_path / "gone.model"), lowercase=False)
    loaded = sentencepiece_tokenizer(other, 16, saved=saved, captions=["ignored"])
    assert loaded.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(loaded(TEXTS), tok(TEXTS))
    assert sentencepiece_tokenizer(other, 8, saved=saved).context_length == 8
    # a saved copy works as tokenizer.path too; a missing saved= falls back to the path
    from_path = sentencepiece_tokenizer(
        SentencePieceTokenizerOptions(path=str(saved)), 16, saved=tmp_path / "none.json"
    )
    np.testing.assert_array_equal(from_path(TEXTS), tok(TEXTS))


def test_missing_or_unreadable_path_is_a_user_error(tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(UserError, match=r"tokenizer\.path: .*missing\.model"):
        load(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(UserError, match=r"tokenizer\.path: .*garbage\.model"):
        load(garbage)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"format": "clip_jax.sentencepiece", "model_proto": "!!"}')
    with pytest.raises(UserError, match="tokenizer.json"):
        sentencepiece_tokenizer(SentencePieceTokenizerOptions(path=str(missing)), 8, saved=broken)


def test_spec_validates():
    spec = validate({"tokenizer": {"name": "sentencepiece", "path": "siglip/spiece.model"}})
    assert spec.tokenizer.name == "sentencepiece"
    assert spec.tokenizer.path == "siglip/spiece.model"
    assert (spec.tokenizer.lowercase, spec.tokenizer.canonicalize) == (True, True)
    assert (spec.tokenizer.pad_id, spec.tokenizer.add_eos) == (None, True)
    with pytest.raises(SpecError) as info:
        validate({"tokenizer": {"name": "sentencepiece", "vocab_size": 10}})
    assert {p for p, _ in info.value.problems} == {"tokenizer.path", "tokenizer.vocab_size"}
    component = get_registry().get("tokenizer", "sentencepiece")
    assert component.plugin == "builtins" and component.description


def test_registering_does_not_import_sentencepiece():
    code = (
        "import sys; from clip_jax.plugins import get_registry; get_registry();"
        "from clip_jax.spec import validate;"
        "validate({'tokenizer': {'name': 'sentencepiece', 'path': 'x.model'}});"
        "bad = [m for m in ('sentencepiece', 'jax', 'tensorflow') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
