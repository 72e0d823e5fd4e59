"""GGUFFile reads what gguf.GGUFReader reads, and refuses corrupt headers."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from peft_jax.models.gguf_reader import open_gguf_fast  # noqa: E402


def _write(path):
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<pad>", "▁the", "  ", "日本"])
    writer.add_token_scores([-1000.0, -1.0, -2.5, -3.0])
    writer.add_token_types([3, 1, 4, 1])
    writer.add_bool("test.flag", True)
    writer.add_int64("test.big", -(2**40))
    rng = np.random.default_rng(0)
    writer.add_tensor("plain.weight", rng.normal(size=(3, 5)).astype(np.float32))
    quantized = gguf.quants.quantize(
        rng.normal(size=(4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("q8.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("half.weight", rng.normal(size=(7,)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_same_fields_and_tensors_as_gguf_reader(tmp_path):
    path = _write(tmp_path / "x.gguf")
    ours, theirs = open_gguf_fast(path), gguf.GGUFReader(path)
    keys = [key for key in theirs.fields if not key.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for key in keys:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == reference.tensor_type
        assert mine.shape == tuple(int(size) for size in reference.shape)
        assert mine.data.dtype == reference.data.dtype
        np.testing.assert_array_equal(mine.data, reference.data)


def test_corrupt_headers_are_errors(tmp_path):
    good = _write(tmp_path / "x.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="outside the file|truncated"):
        open_gguf_fast(truncated)
    # The token list claims 2**60 strings: refused before any allocation.
    position = good.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8
    huge = good[:position] + (2**60).to_bytes(8, "little") + good[position + 8 :]
    (tmp_path / "huge.gguf").write_bytes(huge)
    with pytest.raises(ValueError, match="more than the file holds"):
        open_gguf_fast(tmp_path / "huge.gguf")
    (tmp_path / "not.gguf").write_bytes(b"GGML" + good[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        open_gguf_fast(tmp_path / "not.gguf")
    with pytest.raises(FileNotFoundError):
        open_gguf_fast(tmp_path / "absent.gguf")
