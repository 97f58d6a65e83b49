"""BPE tokenizer: trained on the synthetic captions, fixed-length int32 ids."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from clip_jax.data.synthetic import make_example
from clip_jax.data.tokenizer import BOS, EOS, PAD, TextTokenizer, bpe_tokenizer, train_bpe
from clip_jax.errors import UserError
from clip_jax.schemas import BpeTokenizerOptions

CONTEXT = 16


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [make_example(0, i, 16)[1] for i in range(300)]


@pytest.fixture(scope="module")
def trained(captions) -> Tokenizer:
    return train_bpe(captions, vocab_size=300)


@pytest.fixture
def tokenizer(trained) -> TextTokenizer:
    # TextTokenizer enables padding/truncation on the wrapped object: give each test a copy
    return TextTokenizer(Tokenizer.from_str(trained.to_str()), CONTEXT)


def ids_of(tokenizer: TextTokenizer, name: str) -> int:
    token_id = tokenizer.tokenizer.token_to_id(name)
    assert token_id is not None
    return token_id


def last_non_pad(row: np.ndarray) -> int:
    return int(row[np.nonzero(row)[0][-1]])


def test_special_tokens(tokenizer):
    assert ids_of(tokenizer, PAD) == 0
    assert len({ids_of(tokenizer, t) for t in (PAD, BOS, EOS)}) == 3
    assert 3 < tokenizer.vocab_size <= 300


def test_shape_dtype_and_framing(tokenizer, captions):
    ids = tokenizer(captions[:8])
    assert ids.shape == (8, CONTEXT)
    assert ids.dtype == np.int32
    bos, eos = ids_of(tokenizer, BOS), ids_of(tokenizer, EOS)
    for row in ids:
        assert row[0] == bos
        assert last_non_pad(row) == eos
        length = np.count_nonzero(row)
        # padding only at the end, and never inside the text
        assert (row[:length] != 0).all()
        assert (row[length:] == 0).all()
        assert list(row[:length]).count(eos) == 1
        assert list(row[:length]).count(bos) == 1


def test_short_text_is_padded(tokenizer):
    ids = tokenizer(["a red circle"])[0]
    length = np.count_nonzero(ids)
    assert 3 < length < CONTEXT
    assert (ids[length:] == 0).all()


def test_truncation_keeps_end_token(tokenizer):
    long = " ".join(["a large yellow triangle in the bottom right"] * 10)
    ids = tokenizer([long, "a red circle"])
    assert ids.shape == (2, CONTEXT)
    assert (ids[0] != 0).all()  # filled to the brim
    assert ids[0, 0] == ids_of(tokenizer, BOS)
    assert ids[0, -1] == ids_of(tokenizer, EOS)
    # the truncated text is the start of the full text
    full = TextTokenizer(Tokenizer.from_str(tokenizer.tokenizer.to_str()), 200)([long])[0]
    assert list(ids[0, : CONTEXT - 1]) == list(full[: CONTEXT - 1])


def test_empty_text(tokenizer):
    ids = tokenizer([""])[0]
    assert list(ids[:2]) == [ids_of(tokenizer, BOS), ids_of(tokenizer, EOS)]
    assert (ids[2:] == 0).all()


def test_round_trip_text(trained, captions):
    tokenizer = TextTokenizer(Tokenizer.from_str(trained.to_str()), 64)
    ids = tokenizer(captions[:50])
    for caption, row in zip(captions[:50], ids, strict=True):
        assert row[-1] == 0  # nothing was truncated
        decoded = tokenizer.tokenizer.decode([int(i) for i in row], skip_special_tokens=True)
        assert decoded == caption


def test_lowercase(tokenizer):
    ids = tokenizer(["A Small RED Circle", "a small red circle"])
    assert (ids[0] == ids[1]).all()


def test_different_captions_give_different_ids(tokenizer):
    ids = tokenizer(["a red circle", "a blue circle"])
    assert not (ids[0] == ids[1]).all()


def test_trained_vocabulary_compresses_captions(tokenizer, captions):
    # BPE merges: common caption words become single tokens
    ids = tokenizer(["a red circle"])[0]
    assert np.count_nonzero(ids) <= 2 + 5
    assert tokenizer.tokenizer.token_to_id("Ġcircle") is not None  # byte-level: Ġ is a space


def test_save_load_round_trip(tmp_path, tokenizer, captions):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = TextTokenizer(Tokenizer.from_file(str(path)), CONTEXT)
    assert loaded.vocab_size == tokenizer.vocab_size
    texts = captions[:20] + [" ".join(captions[:6])]
    np.testing.assert_array_equal(loaded(texts), tokenizer(texts))


def test_factory_trains_then_loads_saved(tmp_path, captions):
    options = BpeTokenizerOptions(vocab_size=280)
    trained = bpe_tokenizer(options, CONTEXT, saved=None, captions=captions)
    assert trained.vocab_size <= 280
    path = tmp_path / "tokenizer.json"
    trained.save(path)
    # a saved tokenizer wins over training (captions are ignored)
    loaded = bpe_tokenizer(options, 8, saved=path, captions=["zzz qqq"])
    assert loaded.context_length == 8
    assert loaded.vocab_size == trained.vocab_size
    short, long = trained(captions[:40]), loaded(captions[:40])
    for full_row, cut_row in zip(short, long, strict=True):
        n = np.count_nonzero(full_row)
        if n <= 8:
            assert list(cut_row) == list(full_row[:8])
        else:
            assert list(cut_row[:7]) == list(full_row[:7])
            assert cut_row[7] == full_row[n - 1]  # the end token survives truncation
    np.testing.assert_array_equal(
        TextTokenizer(Tokenizer.from_file(str(path)), CONTEXT)(captions[:4]), trained(captions[:4])
    )
    # options.path is used when no run-folder copy exists
    from_path = bpe_tokenizer(BpeTokenizerOptions(path=str(path)), CONTEXT, saved=tmp_path / "x")
    np.testing.assert_array_equal(from_path(captions[:4]), trained(captions[:4]))


def test_factory_missing_path_is_an_error(tmp_path):
    options = BpeTokenizerOptions(path=str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match=r"tokenizer.path: .*missing.json"):
        bpe_tokenizer(options, CONTEXT, captions=["a red circle"])


def test_factory_unreadable_file_is_an_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("not json")
    with pytest.raises(UserError, match="is not a tokenizer.json"):
        bpe_tokenizer(BpeTokenizerOptions(path=str(bad)), CONTEXT)


def test_pads_with_the_given_id():
    """A loaded tokenizer pads with the tower's pad id, whatever its own padding token."""
    vocab = {"<unk>": 0, PAD: 1, "a": 2, "b": 3}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    np.testing.assert_array_equal(TextTokenizer(words, 4, pad_id=1)(["a b"])[0], [2, 3, 1, 1])
    np.testing.assert_array_equal(TextTokenizer(words, 4, pad_id=0)(["b"])[0], [3, 0, 0, 0])


def test_a_generated_caption_drops_bytes_that_are_not_text(tokenizer):
    """A captioning decoder early in training can emit a lone byte of a multi-byte
    character: it is dropped, not shown as U+FFFD."""
    lone = tokenizer.tokenizer.token_to_id("Ã")  # byte 0xC3: starts a 2-byte character
    words = tokenizer.tokenizer.encode("a red circle").ids
    (text,) = tokenizer.decode(np.array([[*words, lone]]))
    assert text == "a red circle"
