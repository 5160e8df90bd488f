"""SentencePiece-style GGUF tokenizers (``tokenizer.ggml.model`` "llama": Llama 2, Mistral, Phi-3,
Gemma) load as HF tokenizers whose ids equal transformers' own GGUF tokenizer's for the same file
(exact equality, with and without special tokens), and whose decoding equals theirs.

The vocabulary is a tiny SentencePiece-style BPE trained here with ``tokenizers``: pieces that
spell a space "▁", a score per piece, the 256 ``<0xNN>`` byte tokens, no merges in the file. It
is written in three flavours, as real files carry it:

- ``llama``: a "▁" prefix, BOS added; pieces not in score order, so ranking merges by position
  instead of by score changes ids.
- ``phi3``: the prefix before every stretch of text between special tokens; EOS added, not BOS.
- ``gemma2``: no prefix; whitespace-run pieces stored with real spaces; scores that do not follow
  the merge order (Gemma ranks its merges by position).
"""

import random

import gguf
import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from mlx_core import load_tokenizer
from mlx_core.gguf_tokenizer import build_tokenizer, write_tokenizer_files
from mlx_core.tokenizer import Tokenizer

pytestmark = pytest.mark.hf_parity

CORPUS = ["hello world, hello tokenizer!", "The quick brown fox jumps over the lazy dog.",
          "Llama, Mistral and Gemma read SentencePiece pieces: 12 345 6789.",
          "def f(x):\n    return x + 1\n\n", "\tcol one\tcol two", "it's (a) [test]; {ok}? \"yes\""] * 8
TEXTS = ["hello world", " hello world", "   three leading spaces", "trailing spaces   ",
         "multiple   spaces  between", "line one\nline two\n\n\nline four\n", "\ttab\tseparated\t",
         "digits 0123456789 and 3.14", "punctuation: (a), [b]; {c}! ¿d? e... \"q\" 'it's'",
         "naïve café 日本 🙂", "", " ", "\n",
         "<s>control<|end|> inside </s>text", "<think>a thought</think>",
         "<unk> and <bos> <eos> <start_of_turn>user\nhi<end_of_turn>", "<|user|> hi<|end|>",
         "a ▁▁▁▁ spelled b"]
CHAT = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": " hi  there\n"}]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
FLAVOURS = {  # architecture, tokens before the byte tokens (with their types), special ids, flags
    "llama": dict(
        arch="llama", specials=[("<unk>", _UNKNOWN), ("<s>", _CONTROL), ("</s>", _CONTROL),
                                ("<|end|>", _CONTROL), ("<think>", _USER_DEFINED)],
        bos=1, eos=2, unk=0, pad=None, add_bos=True, add_eos=False, space_prefix=True),
    "phi3": dict(
        arch="phi3", specials=[("<unk>", _UNKNOWN), ("<s>", _CONTROL), ("</s>", _CONTROL),
                               ("<|endoftext|>", _CONTROL), ("<|user|>", _CONTROL),
                               ("<|end|>", _CONTROL), ("<think>", _USER_DEFINED)],
        bos=1, eos=2, unk=0, pad=3, add_bos=False, add_eos=True, space_prefix=True),
    "gemma2": dict(
        arch="gemma2", specials=[("<pad>", _CONTROL), ("<eos>", _CONTROL), ("<bos>", _CONTROL),
                                 ("<unk>", _UNKNOWN), ("<mask>", _CONTROL),
                                 ("<start_of_turn>", _CONTROL), ("<end_of_turn>", _CONTROL),
                                 ("<think>", _USER_DEFINED), ("\n", _NORMAL), ("\n\n", _NORMAL),
                                 ("\t", _NORMAL), ("  ", _NORMAL), ("   ", _USER_DEFINED),
                                 ("    ", _NORMAL)],
        bos=2, eos=1, unk=3, pad=0, add_bos=True, add_eos=False, space_prefix=False),
}


def _trained_pieces() -> tuple[list[str], list[str]]:
    """(pieces in the order BPE learned them, the single characters) of a tiny SentencePiece-style
    BPE: words start with "▁"; punctuation and digits stand apart, as in Llama's pieces."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=260, show_progress=False))
    vocab = tok.get_vocab()
    chars = sorted((t for t in vocab if len(t) == 1), key=vocab.get)
    merged = sorted((t for t in vocab if len(t) > 1), key=vocab.get)  # trainer ids: merge order
    return merged, chars


def _vocabulary(flavour: dict) -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types as a GGUF file of this flavour lays them out."""
    merged, chars = _trained_pieces()
    specials = [t for t, _ in flavour["specials"]]
    rank = {p: -float(i) for i, p in enumerate(merged + [c for c in chars if c not in merged])}
    pieces = [p for p in rank if p not in specials]
    if flavour["arch"] == "gemma2":  # file order is merge order; scores say nothing
        scores = [rank[p] for p in pieces]
        random.Random(0).shuffle(scores)
    else:  # scores are merge order; file order is not
        pieces.sort()
        scores = [rank[p] for p in pieces]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [t for _, t in flavour["specials"]] + [6] * 256 + [_NORMAL] * len(pieces)
    return tokens, [0.0] * (len(tokens) - len(pieces)) + scores, types


def _write_gguf(path, name: str, model: bool = False):
    """A GGUF file with this flavour's tokenizer; ``model``: with a complete tiny llama model
    (what load_tokenizer converts), else the tokenizer's metadata only."""
    flavour = FLAVOURS[name]
    tokens, scores, types = _vocabulary(flavour)
    writer = gguf.GGUFWriter(str(path), flavour["arch"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(flavour["bos"])
    writer.add_eos_token_id(flavour["eos"])
    writer.add_unk_token_id(flavour["unk"])
    if flavour["pad"] is not None:
        writer.add_pad_token_id(flavour["pad"])
    writer.add_add_bos_token(flavour["add_bos"])
    writer.add_add_eos_token(flavour["add_eos"])
    writer.add_add_space_prefix(flavour["space_prefix"])
    writer.add_chat_template(TEMPLATE)
    writer.add_block_count(1)
    if model:
        assert flavour["arch"] == "llama"
        hidden, ffn, rng = 8, 16, np.random.default_rng(0)
        writer.add_context_length(64)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(2)
        writer.add_head_count_kv(2)
        writer.add_layer_norm_rms_eps(1e-5)
        shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
                  "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
                  **{f"blk.0.attn_{p}.weight": (hidden, hidden) for p in ("q", "k", "v", "output")},
                  "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
                  "blk.0.ffn_down.weight": (hidden, ffn)}
        for tensor, shape in shapes.items():
            writer.add_tensor(tensor, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _metadata(path) -> dict:
    fields = gguf.GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith(("general.", "tokenizer."))}


def _theirs(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def loaded(request, tmp_path_factory):
    """(flavour name, our tokenizer, transformers' GGUF tokenizer) of one tokenizer-only file."""
    directory = tmp_path_factory.mktemp(request.param)
    (directory / "file").mkdir()
    path = _write_gguf(directory / "file" / f"{request.param}.gguf", request.param)
    write_tokenizer_files(_metadata(path), directory)
    return request.param, Tokenizer.from_dir(directory), _theirs(path)


def test_ids_and_decoding_equal_transformers_gguf_tokenizer(loaded):
    _, ours, theirs = loaded
    for text in TEXTS:
        for special in (False, True):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (False, True):
                assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip), text
        ids = theirs.encode(text, add_special_tokens=False)
        if theirs.decode(ids, skip_special_tokens=False) == text:  # where transformers' round-trips
            assert ours.decode(ours.encode(text, add_special_tokens=False), False) == text


def test_special_tokens_and_chat_template_equal_transformers_gguf_tokenizer(loaded):
    _, ours, theirs = loaded
    # (add_bos_token / add_eos_token: the ids with special tokens, above, are what they do)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template"):
        assert getattr(ours.hf, name) == getattr(theirs, name), name
    text = ours.apply_chat_template(CHAT, tokenize=False)
    assert text == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT) == theirs.encode(text, add_special_tokens=False)


def test_pieces_byte_fallback_and_whitespace_runs(loaded):
    """What the vocabulary itself says, transformers aside: in-vocabulary words are one piece
    each (with the "▁" prefix where the file asks for it), characters outside it fall back to
    their UTF-8 bytes, and Gemma's runs of spaces find their pieces (stored as "  ")."""
    name, ours, _ = loaded
    pieces = ours.hf.convert_ids_to_tokens(ours.encode("hello world", add_special_tokens=False))
    assert pieces[-1] == "▁world"
    assert pieces[:-1] == (["▁hello"] if FLAVOURS[name]["space_prefix"] else ["he", "llo"])
    assert ours.hf.convert_ids_to_tokens(ours.encode("日", add_special_tokens=False))[-3:] == [
        "<0xE6>", "<0x97>", "<0xA5>"]
    if name == "gemma2":
        ids = ours.encode("a  b\n\nc", add_special_tokens=False)
        assert ours.hf.convert_ids_to_tokens(ids) == ["a", "▁▁", "b", "\n\n", "c"]
        assert ids[1] == [t for t, _ in FLAVOURS[name]["specials"]].index("  ")


def test_load_tokenizer_converts_a_whole_llama_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_HOME", str(tmp_path / "home"))
    (tmp_path / "file").mkdir()
    path = _write_gguf(tmp_path / "file" / "tiny-llama-spm.gguf", "llama", model=True)
    ours, theirs = load_tokenizer(path), _theirs(path)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
    assert ours.bos_token_id == 1 and ours.eos_token_ids == [2]


def test_add_space_prefix_false_is_honoured_on_any_architecture(tmp_path):
    """A llama-architecture file saying no "▁" prefix gets none (as llama.cpp reads it;
    transformers' loader picks the prefix by architecture and would add one here)."""
    (tmp_path / "file").mkdir()
    meta = _metadata(_write_gguf(tmp_path / "file" / "llama.gguf", "llama"))
    tok = build_tokenizer({**meta, "tokenizer.ggml.add_space_prefix": False})
    assert tok.encode("hello world", add_special_tokens=False).tokens[0] != "▁hello"
    assert tok.decode(tok.encode(" hello world", add_special_tokens=False).ids) == " hello world"


def test_an_unknown_tokenizer_model_is_named():
    with pytest.raises(ValueError, match=r"GGUF tokenizer model 'bert' is not supported yet; "
                                         r"supported: gpt2 \(byte-level BPE\), llama \(SentencePiece\)"):
        build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
