"""Byte-level BPE GGUF files (``tokenizer.ggml.model`` "gpt2") name llama.cpp's pre-tokenizer in
``tokenizer.ggml.pre``: a list of regexes that llama.cpp applies in order, each splitting the
pieces the one before left and keeping both its matches and the text between them. For every
name mlx supports, the rebuilt tokenizer splits a varied text set (digits of all lengths, CJK,
punctuation runs, contractions, newlines, spaces, marks) exactly as those regexes split it, run
here with Python's ``regex`` (not the Rust ``onig`` engine ``tokenizers`` uses), and its BPE
never merges across those pieces.

The regexes below are llama.cpp's (src/llama-vocab.cpp: ``regex_exprs`` per
``LLAMA_VOCAB_PRE_TYPE_*``, and the ``tokenizer.ggml.pre`` names ``llama_vocab::impl::load`` maps
to each), as its C++ spells them. Where llama.cpp runs a rewrite of the model's tokenizer.json
regex (it quotes the original), the original is what mlx and transformers use; the rewrite
splits the same but for combining marks and non-ASCII capitals (tekken, gpt-4o). Where
transformers' GGUF loader knows the name, ids equal its tokenizer's for the same file."""

import json

import gguf
import pytest
import regex
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mlx_core.gguf_tokenizer import PRE_TOKENIZER_SPLITS, build_tokenizer, write_tokenizer_files
from mlx_core.tokenizer import Tokenizer

LLAMA_CPP = {
    "GPT2": (
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    "STARCODER": (
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ),
    "FALCON": (
        "[\\p{P}\\$\\+<=>\\^~\\|`]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "[0-9][0-9][0-9]",
    ),
    "LLAMA3": (
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|"
            "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
            "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        ),
    ),
    "QWEN2": (
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|"
            "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
            "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        ),
    ),
    "QWEN35": (
        (
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|"
            "[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}|"
            " ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        ),
    ),
    "TEKKEN": (
        (
            "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|"
            "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|"
            "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        ),
    ),
    "GPT4O": (
        (
            "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+"
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|"
            "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*"
            "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}|"
            " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        ),
    ),
    "DEEPSEEK_LLM": (
        "[\r\n]",
        (
            "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿ"
            "ᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴ"
            "ℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
        ),
        "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}+",
    ),
    "DEEPSEEK_CODER": (
        "[\r\n]",
        "\\s?\\p{L}+",
        "\\s?\\p{P}+",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}",
    ),
    "DEEPSEEK3_LLM": (
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        (
            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|"
            "[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|"
            "\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
        ),
    ),
}
TOKENIZER_JSON = {
    "LLAMA3": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"
        " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ),
    "QWEN2": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
        " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ),
    "QWEN35": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}|"
        " ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ),
    "TEKKEN": (
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|"
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|"
        "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ),
    "GPT4O": (
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}|"
        " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    ),
}
# llama.cpp's groups: the pre-types that run another's regexes
SAME_AS = {"MPT": "GPT2", "OLMO": "GPT2", "JAIS": "GPT2", "TRILLION": "GPT2",
           "GRANITE_DOCLING": "GPT2", "REFACT": "STARCODER", "COMMAND_R": "STARCODER",
           "SMOLLM": "STARCODER", "CODESHELL": "STARCODER", "EXAONE": "STARCODER",
           "MINERVA": "STARCODER", "MELLUM2": "STARCODER", "DBRX": "LLAMA3", "SMAUG": "LLAMA3",
           "CHATGLM4": "LLAMA3", "STABLELM2": "QWEN2", "HUNYUAN": "QWEN2", "SOLAR_OPEN": "QWEN2",
           "GROK_2": "QWEN2", "MINIMAX_M2": "GPT4O", "HUNYUAN_DENSE": "DEEPSEEK3_LLM",
           "JOYAI_LLM": "DEEPSEEK3_LLM", "HY_V4": "DEEPSEEK3_LLM"}
NAMES = {  # tokenizer.ggml.pre -> LLAMA_VOCAB_PRE_TYPE_*
    **dict.fromkeys(["gpt-2", "phi-2", "exaone4", "gigachat", "a.x-4.0", "mellum"], "GPT2"),
    "mpt": "MPT", "olmo": "OLMO", "jais": "JAIS", "trillion": "TRILLION",
    "granite-docling": "GRANITE_DOCLING",
    "starcoder": "STARCODER", "refact": "REFACT", "command-r": "COMMAND_R", "smollm": "SMOLLM",
    "codeshell": "CODESHELL", "exaone": "EXAONE", "minerva-7b": "MINERVA", "mellum2": "MELLUM2",
    "falcon": "FALCON",
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"], "LLAMA3"),
    "dbrx": "DBRX", "smaug-bpe": "SMAUG", "chatglm-bpe": "CHATGLM4", "glm4": "CHATGLM4",
    "glm5": "CHATGLM4",
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez", "kormo", "f2llmv2"], "QWEN2"),
    "stablelm2": "STABLELM2", "hunyuan": "HUNYUAN", "solar-open": "SOLAR_OPEN", "grok-2": "GROK_2",
    "qwen35": "QWEN35", "tekken": "TEKKEN",
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie"], "GPT4O"),
    "minimax-m2": "MINIMAX_M2",
    "deepseek-llm": "DEEPSEEK_LLM", "deepseek-coder": "DEEPSEEK_CODER",
    "deepseek-v3": "DEEPSEEK3_LLM", "hunyuan-dense": "HUNYUAN_DENSE", "joyai-llm": "JOYAI_LLM",
    "hy_v4": "HY_V4",
}
# DeepSeek-V3's own tokenizer.json: its pre-tokenizer's Split regexes, as JSON spells them
DEEPSEEK_V3_TOKENIZER_JSON = r"""[
  "\\p{N}{1,3}",
  "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
  "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
]"""
MARKS = ("e\u0301 n\u0303 \u0939\u093f\u0928\u094d\u0926\u0940"  # Devanagari, then Thai
         " \u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22")
CAPITALS = "na\u00efve caf\u00e9 \u00c9clair a\u00c9b \u00c0\u00c9\u00ce"
TEXTS = [
    "Hello world", "It's 2024: 1 12 123 1234 12345 1234567 digits", "3.14159, 1,234,567.89 $100",
    "\uff13\uff14\uff15 \u0663\u0664\u0665\u0666 \u00b2\u00b3 \u00bd \u216b",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u4e2d\u6587\u5b57\u7b26\u3002"
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8 \u30ab\u30bf\u30ab\u30ca \u3072\u3089\u304c\u306a",
    "it's I'M we'll they'VE you'd don't", "a... !!! ?? --> ==> (x)[y]{z} 'q' \"dq\" @#%&*",
    "line1\nline2\r\n\n\n  indented\n\ttab\n", "carriage\rreturn \r\nnext\n\r",
    "trailing   ", "   leading", "a  b   c    d",
    CAPITALS, MARKS, "x\u00a0y\u3000z", "emoji \U0001f642\U0001f642 ok \U0001f44d\U0001f3fd",
    "CamelCaseWord HTTPServer iPhone McDonald's", "<a>|b^c~d`e +5 =6",
    "path/to/file.py foo_bar-baz",
    "\U00010400\U00010428 \u2126mega \u212aelvin \ufb01ne",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u0443\u0441\u0441\u043a\u0438\u0439"
    " \u0540\u0561\u0575\u0565\u0580\u0565\u0576",
    "def f(x):\n    return x+1  # comment\n", "", " ", "\n", "\r\n",
]
CORPUS = [*TEXTS, "The quick brown fox jumps over the lazy dog 12345 and 2024.",
          "hello world, hello GGUF! digits 0123456789", "    indented code()\n\n"] * 4
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# names transformers' GGUF loader splits as llama.cpp does (the GPT-2 ones: its default split)
TRANSFORMERS_READS = ("gpt-2", "olmo", "llama-bpe", "dbrx", "pixtral", "qwen2", "deepseek-r1-qwen",
                      "qwen35", "tekken", "gpt-4o", "llama4", "minimax-m2")


def _llama_cpp_regexes(name: str) -> tuple[str, ...]:
    pre_type = SAME_AS.get(NAMES[name], NAMES[name])
    return (TOKENIZER_JSON[pre_type],) if pre_type in TOKENIZER_JSON else LLAMA_CPP[pre_type]


def _llama_cpp_split(text: str, regexes) -> list[str]:
    """``text`` split as llama.cpp's unicode_regex_split splits it: each regex in turn cuts each
    piece into its matches and the text between them."""
    pieces = [text]
    for pattern in map(regex.compile, regexes):
        split = []
        for piece in pieces:
            start = 0
            for match in pattern.finditer(piece):
                split += [piece[start:match.start()], match.group()]
                start = match.end()
            split.append(piece[start:])
        pieces = [p for p in split if p]
    return pieces


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> character table (what a byte-level vocabulary spells text with)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


SPELLING = _byte_spelling()


def _spelled(piece: str) -> str:
    return "".join(SPELLING[b] for b in piece.encode("utf-8"))


@pytest.fixture(scope="module")
def vocabulary():
    """(tokens, merges) of a tiny byte-level BPE trained with GPT-2's split, so that it has merges
    across what other pre-tokenizers keep apart (" 12345", "\\n\\n", "é" with its mark)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def _write_gguf(path, tokens, merges, pre: str):
    """A llama-architecture GGUF file with a byte-level BPE tokenizer's metadata only."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _metadata(path) -> dict:
    fields = gguf.GGUFReader(path).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith(("general.", "tokenizer."))}


@pytest.fixture(scope="module")
def files(vocabulary, tmp_path_factory):
    """Name -> a tokenizer-only GGUF file stating that pre-tokenizer."""
    directory = tmp_path_factory.mktemp("pre")
    return {name: _write_gguf(directory / f"{name}.gguf", *vocabulary, name) for name in NAMES}


def test_the_supported_names_are_llama_cpps():
    assert set(PRE_TOKENIZER_SPLITS) == set(NAMES)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_splits_equal_llama_cpps_regexes(name, files):
    tok = build_tokenizer(_metadata(files[name]))
    regexes = _llama_cpp_regexes(name)
    for text in TEXTS:
        expected = [_spelled(p) for p in _llama_cpp_split(text, regexes)]
        assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)] == expected, text
        # BPE merges within those pieces only, and decodes back to the text
        encoding = tok.encode(text, add_special_tokens=False)
        tokens = iter(encoding.tokens)
        for piece in expected:
            joined = ""
            while len(joined) < len(piece):
                joined += next(tokens)
            assert joined == piece, (text, piece)
        assert next(tokens, None) is None
        assert tok.decode(encoding.ids) == text


def test_the_pre_tokenizers_tell_the_names_apart(files):
    """Not one split for all: each of llama.cpp's regex lists splits this text its own way."""
    text = "x 1234567 CamelCase don't e\u0301t\u00e9 \u65e5\u672c\u8a9e\u3067\u3059\n\n(a+b)"
    splits = {name: tuple(p for p, _ in build_tokenizer(_metadata(path)).pre_tokenizer
                          .pre_tokenize_str(text)) for name, path in files.items()}
    kinds = {SAME_AS.get(NAMES[name], NAMES[name]) for name in NAMES}
    assert len(set(splits.values())) == len(kinds)
    assert splits["deepseek-v3"][1:5] == (_spelled(" "), "123", "456", "7")
    assert splits["deepseek-coder"][1:5] == (_spelled(" "), "1", "2", "3")
    assert splits["deepseek-llm"][1:3] == (_spelled(" "), "1234567")
    assert splits["tekken"][9:11] == (_spelled(" Camel"), "Case")


@pytest.mark.parametrize("pre_type", sorted(TOKENIZER_JSON))
def test_llama_cpps_rewrites_split_as_the_tokenizer_json_regex_but_marks_and_capitals(pre_type):
    """llama.cpp runs a rewrite of these regexes its std::regex can take; mlx runs the model's
    own tokenizer.json regex (which llama.cpp quotes). They split this text set alike, except
    that tekken's and gpt-4o's rewrites split off combining marks (Devanagari's vowel signs) and
    a non-ASCII capital after a small letter ("aÉb"), which the model's tokenizer keeps."""
    differ = {text for text in TEXTS if _llama_cpp_split(text, LLAMA_CPP[pre_type])
              != _llama_cpp_split(text, (TOKENIZER_JSON[pre_type],))}
    assert differ == ({MARKS, CAPITALS} if pre_type in ("TEKKEN", "GPT4O") else set())


def test_deepseek_v3_splits_as_its_own_tokenizer_json(files):
    tok = build_tokenizer(_metadata(files["deepseek-v3"]))
    steps = json.loads(tok.to_str())["pre_tokenizer"]["pretokenizers"]
    assert [s["pattern"]["Regex"] for s in steps[:-1]] == json.loads(DEEPSEEK_V3_TOKENIZER_JSON)
    assert all(s["type"] == "Split" and s["behavior"] == "Isolated" for s in steps[:-1])
    assert steps[-1]["type"] == "ByteLevel" and not steps[-1]["use_regex"]


@pytest.mark.hf_parity
@pytest.mark.parametrize("name", TRANSFORMERS_READS)
def test_ids_equal_transformers_gguf_tokenizer(name, files, tmp_path):
    path = files[name]
    write_tokenizer_files(_metadata(path), tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in [*TEXTS, "<|im_start|>user\nhi 12345<|im_end|><|endoftext|>"]:
        for special in (False, True):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, special) == ids, (text, special)


def test_an_unknown_pre_tokenizer_is_named_with_the_supported_ones(files):
    meta = {**_metadata(files["gpt-2"]), "tokenizer.ggml.pre": "nonesuch"}
    with pytest.raises(ValueError, match="GGUF pre-tokenizer 'nonesuch' is not supported yet; "
                                         "supported: gpt2/default, ") as raised:
        build_tokenizer(meta)
    assert all(name in str(raised.value) for name in NAMES)
