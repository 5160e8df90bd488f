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
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2/3: digits one by one


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt-2", "gpt2"):
        return byte_level
    if pre == "smollm":  # SmolLM: digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
             "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported yet; "
                     "supported: gpt2/default, smollm, llama3, qwen2")


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
