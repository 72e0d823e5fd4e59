"""Tests for peft_jax.data: shipped text, JSONL loading, tokenizer, batches."""

import json

import numpy as np
import pytest

from peft_jax.data import ByteTokenizer, batches, load_text, window_bos


def test_shipped_text_is_the_plays_without_gutenberg_boilerplate():
    text = load_text()
    assert 200_000 <= len(text.encode("utf-8")) <= 400_000
    assert text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "To be, or not to be,--that is the question:--" in text
    assert "MACBETH" in text and "THE TEMPEST" in text
    assert "Gutenberg" not in text and "GUTENBERG" not in text
    assert "\r" not in text


def test_load_text_reads_a_plain_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(path) == "héllo\nworld\n"
    assert load_text(str(path)) == "héllo\nworld\n"


def test_load_text_joins_jsonl_records_and_skips_blank_lines(tmp_path):
    path = tmp_path / "corpus.jsonl"
    records = [{"text": "first", "id": 1}, {"text": "second"}]
    lines = [json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert load_text(path) == "first\nsecond"


def test_load_text_rejects_jsonl_without_text_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: .*\"text\""):
        load_text(path)


def test_load_text_rejects_invalid_json(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("{not json}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"corpus.jsonl:1: invalid JSON"):
        load_text(path)


def test_load_text_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(tmp_path / "missing.txt")


def test_byte_tokenizer_round_trips_utf8():
    tokenizer = ByteTokenizer()
    text = "To be, or not to be — ça va?"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size == 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([0xFF]) == "\ufffd"


def test_batches_shapes_dtypes_and_shifted_labels():
    tokens = np.arange(1000, dtype=np.int32)
    inputs, labels = next(batches(tokens, 4, 16, seed=0))
    assert inputs.shape == labels.shape == (4, 16)
    assert inputs.dtype == labels.dtype == np.int32
    # Consecutive ids make every window arithmetic: labels are inputs + 1.
    np.testing.assert_array_equal(labels, inputs + 1)
    np.testing.assert_array_equal(np.diff(inputs, axis=1), 1)


def test_batches_are_deterministic_per_seed():
    tokens = np.arange(1000)
    first = list(batches(tokens, 2, 8, seed=3, num_batches=3))
    again = list(batches(tokens, 2, 8, seed=3, num_batches=3))
    other = list(batches(tokens, 2, 8, seed=4, num_batches=3))
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert any(not np.array_equal(x, x2) for (x, _), (x2, _) in zip(first, other))


def test_train_and_eval_splits_are_disjoint_and_eval_is_the_tail():
    tokens = np.arange(1000)  # eval_fraction 0.1 holds out ids 900..999.
    train = batches(tokens, 8, 10, seed=0, eval_fraction=0.1, num_batches=50)
    for _, labels in train:
        assert labels.max() < 900
    for inputs, labels in batches(
        tokens, 8, 10, seed=0, split="eval", eval_fraction=0.1, num_batches=50
    ):
        assert inputs.min() >= 900 and labels.max() <= 999


def test_batches_cover_the_last_window_of_a_split():
    tokens = np.arange(12)  # Exactly two windows of 11 tokens in the train split.
    train = batches(tokens, 1, 10, seed=0, eval_fraction=0.01, num_batches=64)
    starts = {int(inputs[0, 0]) for inputs, _ in train}
    assert starts == {0, 1}


def test_batches_on_the_shipped_text():
    tokens = ByteTokenizer().encode(load_text())
    inputs, labels = next(batches(tokens, 2, 64, seed=0, split="eval"))
    assert inputs.shape == (2, 64)
    np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])


def test_batches_with_bos_start_every_example_with_it():
    tokens = np.arange(10, 1000, dtype=np.int32)
    for split in ("train", "eval"):
        inputs, labels = next(batches(tokens, 4, 16, seed=0, split=split, bos_id=2))
        assert inputs.shape == labels.shape == (4, 16)
        assert (inputs[:, 0] == 2).all() and (labels >= 10).all()
        # After <bos>: seq_len consecutive stream tokens, the first one a label.
        np.testing.assert_array_equal(inputs[:, 1:], labels[:, :-1])
        np.testing.assert_array_equal(np.diff(labels, axis=1), 1)
    # The window is seq_len stream tokens: 11 tokens hold exactly two of 10.
    starts = {int(y[0, 0]) for _, y in batches(
        np.arange(12), 1, 10, seed=0, eval_fraction=0.1, num_batches=64, bos_id=5)}
    assert starts == {0, 1}


def test_window_bos_follows_add_bos_token():
    class Adds:
        bos_token_id, add_bos_token = 7, True

    class DoesNot:
        bos_token_id, add_bos_token = 7, False

    assert window_bos(Adds()) == 7
    assert window_bos(DoesNot()) is None and window_bos(ByteTokenizer()) is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(split="test"), "split"),
        (dict(eval_fraction=0.0), "eval_fraction"),
        (dict(eval_fraction=1.0), "eval_fraction"),
        (dict(seq_len=100), "fewer than one window"),
    ],
)
def test_batches_rejects_bad_arguments(kwargs, message):
    arguments = dict(batch_size=2, seq_len=8, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        next(batches(np.arange(100), **arguments))


def test_batches_rejects_non_1d_tokens():
    with pytest.raises(ValueError, match="1-D"):
        next(batches(np.zeros((4, 50), np.int32), 2, 8, seed=0))
