"""Rebuild an HF tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) from GGUF metadata.

GGUF stores a tokenizer as its vocabulary, token types and special-token ids, in one of two kinds
(``tokenizer.ggml.model``):

- ``"gpt2"``: byte-level BPE; the vocabulary is already in the byte-to-unicode spelling, the
  merges are listed and ``tokenizer.ggml.pre`` names the pre-tokenizer llama.cpp uses.
- ``"llama"``: SentencePiece BPE (Llama 2, Mistral, Phi-3, Gemma); pieces spell a space "▁",
  each has a score, bytes outside the vocabulary fall back to the 256 ``<0xNN>`` tokens, and
  there are usually no merges. Rebuilt as transformers' own GGUF loader rebuilds it, so the ids
  equal theirs (tests/core/test_gguf_spm_tokenizer.py).

Built with ``tokenizers`` only (no torch, no transformers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

SUPPORTED_MODELS = ("gpt2", "llama")  # tokenizer.ggml.model: byte-level BPE, SentencePiece BPE
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
_SPACE = "\u2581"  # how SentencePiece spells a space
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# llama.cpp's pre-tokenizers (src/llama-vocab.cpp: llm_tokenizer_bpe's regex_exprs for each
# LLAMA_VOCAB_PRE_TYPE_*, and llama_vocab::impl::load for the tokenizer.ggml.pre names of each).
# A list of regexes applied in order, each splitting the pieces the one before left and keeping
# both its matches and the text between them ("isolated"). Where llama.cpp quotes the model's own
# tokenizer.json regex and runs a rewrite its std::regex can take, the tokenizer.json one is used
# (transformers' GGUF loader uses it too): the rewrites of llama3/qwen2/qwen35 spell
# (?i:'s|...) as '[sS]|..., and those of tekken/gpt-4o split off combining marks ("हिन्दी") and a
# non-ASCII capital after a small letter, which the model's own tokenizer does not.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/3: digits one by one
_QWEN35_SPLIT = (  # Qwen3.5: combining marks stay with their letters
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (  # Mistral Nemo and later: CamelCase parts apart, digits one by one
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (  # o200k (Llama 4, MiniMax-M2): tekken's words with contractions, digits in 3s
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek's, as llama.cpp's C++ spells them (the same escapes in Python); DeepSeek-V3's equal
# the Split pre-tokenizers of DeepSeek-V3's own tokenizer.json.
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_LETTERS = (  # cased letters: Latin, Greek, Cyrillic, Armenian, Georgian, ...
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f"
    "\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_DEEPSEEK_LLM = (  # DeepSeek-V2 and DeepSeek LLM
    "[\r\n]",
    _DEEPSEEK_LLM_LETTERS,
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    _CJK_HANGUL,
    "\\p{N}+",
)
_DEEPSEEK_CODER = ("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", _CJK_HANGUL, "\\p{N}")
_DEEPSEEK_V3 = (  # DeepSeek-V3 and R1
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
# tokenizer.ggml.pre -> its regexes, grouped as llama.cpp groups the names: those of generative
# byte-level BPE models (not embedding models', nor kimi-k2's or afmoe's, which llama.cpp splits
# with code of its own, nor the rarer ones: chameleon, bloom, poro-chat, viking, superbpe, ...)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {name: splits for splits, names in (
    ((_GPT2_SPLIT,), ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling",
                      "exaone4", "gigachat", "a.x-4.0", "mellum")),
    (("\\p{N}", _GPT2_SPLIT), ("starcoder", "refact", "command-r", "smollm", "codeshell",
                               "exaone", "minerva-7b", "mellum2")),
    (("[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2_SPLIT, "[0-9][0-9][0-9]"), ("falcon",)),
    ((_LLAMA3_SPLIT,), ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                        "midm-2.0", "lfm2", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4", "glm5")),
    ((_QWEN2_SPLIT,), ("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "solar-open",
                       "megrez", "kormo", "f2llmv2", "grok-2")),
    ((_QWEN35_SPLIT,), ("qwen35",)),
    ((_TEKKEN_SPLIT,), ("tekken",)),
    ((_GPT4O_SPLIT,), ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")),
    (_DEEPSEEK_LLM, ("deepseek-llm",)),
    (_DEEPSEEK_CODER, ("deepseek-coder",)),
    (_DEEPSEEK_V3, ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4")),
) for name in names}
_GPT2_DEFAULTS = (None, "default", "gpt2")  # no name, or not llama.cpp's: GPT-2's split


def _pre_tokenizer(pre: str | None):
    if pre in _GPT2_DEFAULTS:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported yet; supported: "
                         f"gpt2/default, {', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    return pre_tokenizers.Sequence([
        *(pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _token(meta: dict[str, Any], key: str) -> str | None:
    index = meta.get(f"tokenizer.ggml.{key}")
    return None if index is None else meta["tokenizer.ggml.tokens"][index]


def _kind(meta: dict[str, Any]) -> str:
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_MODELS:
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported yet; supported: "
                         "gpt2 (byte-level BPE), llama (SentencePiece)")
    return kind


def _adds(meta: dict[str, Any], end: str) -> bool:
    """Whether encoding adds the ``end`` ("bos" or "eos") token. A SentencePiece file that does
    not say adds BOS: llama.cpp and transformers both do."""
    default = end == "bos" and meta.get("tokenizer.ggml.model") == "llama"
    return (bool(meta.get(f"tokenizer.ggml.add_{end}_token", default))
            and meta.get(f"tokenizer.ggml.{end}_token_id") is not None)


def _file_merges(meta: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]


def _byte_level_tokenizer(meta: dict[str, Any]) -> tuple[Tokenizer, list[str]]:
    tokens = list(meta["tokenizer.ggml.tokens"])
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=_file_merges(meta),
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, tokens


def _spm_pieces(meta: dict[str, Any]) -> list[str]:
    """The pieces as text reaches them. Gemma files store a piece of spaces (and other
    whitespace) with real spaces, "  ", while text reaches the model with its spaces as "▁":
    respelled "▁▁" (as transformers does), runs of spaces find their pieces."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    if meta.get("general.architecture") not in _GEMMA_ARCHS:
        return tokens
    return [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]


def _spm_merges(meta: dict[str, Any], pieces: list[str]) -> list[tuple[str, str]]:
    """HF BPE merges for a SentencePiece vocabulary.

    SentencePiece BPE joins the adjacent pair whose join is the best-scored piece; files mostly
    list no merges, so they are derived as transformers derives them: every split of a piece into
    two pieces is a merge, ranked by that piece's score (ties: the longer left part, then the
    longer right part, then file order). Gemma's scores do not follow its merge order but its
    piece order does, so there a piece ranks by its position (so do files without scores)."""
    if "tokenizer.ggml.merges" in meta:
        return _file_merges(meta)
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or meta.get("general.architecture") in _GEMMA_ARCHS:
        scores = [-i for i in range(len(pieces))]
    ids = {p: i for i, p in enumerate(pieces)}  # a repeated piece keeps its last id, as the vocab
    ranked = []
    for piece, score in dict(zip(pieces, scores, strict=True)).items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in ids and piece[k:] in ids]
        ranked += [(score, left, right)
                   for left, right in sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]]))]
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: file order
    return [(left, right) for _, left, right in ranked]


def _prefix_space(meta: dict[str, Any]) -> bool:
    """SentencePiece's dummy prefix: a "▁" before the text, so that its first word is spelled as
    every other. The file says whether (Gemma: no); without the key, all but Gemma have one.
    (transformers' loader decides by architecture alone; the two agree on real files.)"""
    default = meta.get("general.architecture") not in _GEMMA_ARCHS
    return bool(meta.get("tokenizer.ggml.add_space_prefix", default))


def _spm_tokenizer(meta: dict[str, Any]) -> tuple[Tokenizer, list[str]]:
    pieces = _spm_pieces(meta)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                               merges=_spm_merges(meta, pieces),
                               unk_token=None if unk is None else pieces[unk],
                               fuse_unk=True, byte_fallback=True))
    prefix = _prefix_space(meta)
    if meta.get("general.architecture") == "phi3":
        # Phi-3's own tokenizer prefixes every stretch of text between special tokens, not only
        # the start of the input ("<|user|>hi" -> "▁hi"); transformers rebuilds it that way.
        prepend = [normalizers.Prepend(_SPACE)] if prefix else []
        tok.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", _SPACE)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPACE, prepend_scheme="first" if prefix else "never", split=False)
    # "▁" back to a space and <0xNN> runs back to their UTF-8 text; the prefix's space removed
    strip = [decoders.Strip(content=" ", left=1, right=0)] if prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tok, pieces


def _template(meta: dict[str, Any], tokens: list[str]) -> processors.TemplateProcessing | None:
    """BOS/EOS around each sequence as the file asks; the template transformers builds on load
    from add_bos_token / add_eos_token (None: the file adds neither)."""
    ends = {end: meta[f"tokenizer.ggml.{end}_token_id"] for end in ("bos", "eos") if _adds(meta, end)}
    if not ends:
        return None
    bos, eos = (tokens[ends[e]] if e in ends else None for e in ("bos", "eos"))

    def around(seq: str, type_id: int) -> str:
        return " ".join(f"{t}:{type_id}" for t in (bos, seq, eos) if t is not None)

    return processors.TemplateProcessing(
        single=around("$A", 0), pair=f"{around('$A', 0)} {around('$B', 1)}",
        special_tokens=[(tokens[i], i) for i in ends.values()])


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    build = _byte_level_tokenizer if _kind(meta) == "gpt2" else _spm_tokenizer
    tok, tokens = build(meta)
    # Control tokens (<s>, <|im_end|>) match whole, as special tokens; user-defined ones
    # (<think>) match whole too but are text. Spelled as the vocabulary spells them, so each
    # keeps its id; a user-defined Gemma whitespace piece respelled "▁▁" is left to the
    # pre-tokenizer's spaces, as transformers leaves it.
    types = dict(enumerate(meta.get("tokenizer.ggml.token_type") or []))  # may be absent
    spelled = meta["tokenizer.ggml.tokens"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for i, t in enumerate(tokens) if types.get(i) == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for i, t in enumerate(tokens)
                    if types.get(i) == _USER_DEFINED and t == spelled[i]])
    template = _template(meta, tokens)
    if template is not None:
        tok.post_processor = template
    return tok


def write_tokenizer_files(meta: dict[str, Any], out_dir: Path) -> None:
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(meta, "bos_token_id"),
        "eos_token": _token(meta, "eos_token_id"),
        "unk_token": _token(meta, "unknown_token_id"),
        "pad_token": _token(meta, "padding_token_id"),
        "add_bos_token": _adds(meta, "bos"),
        "add_eos_token": _adds(meta, "eos"),
        "add_prefix_space": _kind(meta) == "llama" and _prefix_space(meta),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length", 2048),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
