"""Text classification on a zoo language model: padded, length-bucketed batches
(``TextDataLoaders``), a classification head on the last real token's hidden state
(``TextClassifier``), layer groups for gradual unfreezing and ``text_classifier_learner``.

Batches are ``(ids [B, T] int64, mask [B, T] bool, labels [B])``: ``mask`` marks real tokens
(padding is ``pad_id``, at the end unless ``pad_first``), and the model pools the hidden state of
each row's last real token (the causal model has read the whole text there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from mlx_train.data import DataLoaders, Loader, RandomSplitter, StratifiedSplitter
from mlx_train.learner import Learner
from mlx_train.samplers import BucketSampler
from mlx_train.vision_data import encode_labels


class PadCollate:
    """Collate ``(ids, label)`` items (or ``(ids,)``) of any lengths into ``(ids, mask[, y])``:
    pad with ``pad_id`` at the end (or the start with ``pad_first``), truncating to ``max_len``
    tokens (keeping the first ones)."""

    def __init__(self, pad_id: int = 0, pad_first: bool = False, max_len: int | None = None):
        self.pad_id, self.pad_first, self.max_len = int(pad_id), pad_first, max_len

    def __call__(self, items) -> tuple:
        seqs = [torch.as_tensor(it[0], dtype=torch.long)[: self.max_len] for it in items]
        if any(s.dim() != 1 for s in seqs):
            raise ValueError("PadCollate takes 1-D token id sequences")
        t = max(max(len(s) for s in seqs), 1)
        ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), t, dtype=torch.bool)
        for i, s in enumerate(seqs):
            span = slice(t - len(s), t) if self.pad_first else slice(0, len(s))
            ids[i, span], mask[i, span] = s, True
        if len(items[0]) < 2:
            return ids, mask
        return ids, mask, torch.as_tensor([it[1] for it in items])


class TextDataLoaders(DataLoaders):
    """``DataLoaders`` of padded token-id batches; ``tokenizer`` (optional) for ``from_texts``,
    ``show_batch`` and ``predict`` on strings."""

    tokenizer = None
    collate = PadCollate()

    @classmethod
    def from_token_ids(cls, seqs: Sequence[Sequence[int]], labels, *, pad_id: int = 0,
                       pad_first: bool = False, max_len: int | None = None,
                       valid_pct: float = 0.2, seed: int | None = None,
                       splits: tuple[Sequence[int], Sequence[int]] | None = None,
                       stratify: bool = False, bs: int = 32, val_bs: int | None = None,
                       bucket: bool = True, bucket_mult: int = 50,
                       vocab: Sequence | None = None, tokenizer=None) -> TextDataLoaders:
        """Split ``seqs`` / ``labels`` (``splits``, or ``valid_pct`` with ``seed``, per class
        with ``stratify``). With ``bucket`` the training batches group similar lengths
        (``BucketSampler``); validation keeps dataset order. Labels may be ints or names."""
        seqs = [list(map(int, s)) for s in seqs]
        y, found_vocab = encode_labels(labels, vocab)
        if len(seqs) != len(y):
            raise ValueError(f"{len(seqs)} sequences but {len(y)} labels")
        if any(len(s) == 0 for s in seqs):
            raise ValueError("empty token sequences cannot be classified")
        if splits is None:
            splits = (StratifiedSplitter(valid_pct, seed)(y.tolist()) if stratify
                      else RandomSplitter(valid_pct, seed)(len(seqs)))
        train_idx, valid_idx = (list(s) for s in splits)
        collate = PadCollate(pad_id, pad_first, max_len)
        train_items = [(seqs[i], int(y[i])) for i in train_idx]
        if bucket:
            lengths = [min(len(s), max_len or len(s)) for s, _ in train_items]
            train = DataLoader(train_items, batch_sampler=BucketSampler(
                lengths, bs, shuffle=True, bucket_mult=bucket_mult, seed=seed), collate_fn=collate)
        else:
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            train = DataLoader(train_items, batch_size=bs, shuffle=True, generator=g,
                               collate_fn=collate)
        valid = None
        if valid_idx:
            valid = DataLoader([(seqs[i], int(y[i])) for i in valid_idx], batch_size=val_bs or bs,
                               shuffle=False, collate_fn=collate)
        vocab = found_vocab if found_vocab is not None else vocab
        if vocab is None:
            vocab = [str(i) for i in range(int(y.max()) + 1)]
        dls = cls(train, valid, n_inp=2, vocab=vocab)
        dls.collate, dls.tokenizer = collate, tokenizer
        return dls

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels, tokenizer, *,
                   add_special_tokens: bool = True, pad_id: int | None = None,
                   **kwargs) -> TextDataLoaders:
        """Tokenize ``texts`` with ``tokenizer`` (an ``mlx_core`` ``Tokenizer``: ``encode`` /
        ``decode``), then ``from_token_ids``. ``pad_id`` defaults to the tokenizer's pad token
        (else 0: padded positions are masked, so any id works)."""
        seqs = [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
            pad_id = 0 if pad_id is None else pad_id
        return cls.from_token_ids(seqs, labels, pad_id=pad_id, tokenizer=tokenizer, **kwargs)

    def test_dl(self, items, bs: int = 64) -> Loader:
        """A loader over new texts (strings, with a tokenizer) or token-id sequences."""
        seqs = []
        for it in items:
            if isinstance(it, (tuple, list)) and len(it) == 1 and not isinstance(it[0], int):
                it = it[0]
            if isinstance(it, str):
                if self.tokenizer is None:
                    raise ValueError("these DataLoaders have no tokenizer: pass token ids")
                it = self.tokenizer.encode(it)
            seqs.append((torch.as_tensor(it, dtype=torch.long).reshape(-1),))
        return Loader(DataLoader(seqs, batch_size=bs, shuffle=False, collate_fn=self.collate),
                      self.after_batch)

    def decode_row(self, ids: torch.Tensor, mask: torch.Tensor) -> str:
        real = ids[mask.bool()].tolist()
        if self.tokenizer is not None:
            return self.tokenizer.decode(real)
        return " ".join(map(str, real))

    def show_batch(self, max_n: int = 5, width: int = 100) -> list[tuple[str, str]]:
        """Print the first ``max_n`` training rows (label, then the text or ids, cut to
        ``width`` characters); returns them as ``(label, text)`` pairs."""
        if self.train is None:
            raise ValueError("these DataLoaders have no training loader")
        ids, mask, y = self.train.first()[:3]
        rows = []
        for i in range(min(max_n, len(ids))):
            label = self.vocab[int(y[i])] if self.vocab else str(int(y[i]))
            rows.append((str(label), self.decode_row(ids[i], mask[i])))
        w = max(len(r[0]) for r in rows)
        for label, text in rows:
            text = text.replace("\n", " ")
            print(f"{label:<{w}}  {text[:width]}{'...' if len(text) > width else ''}")
        return rows


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (padding on either side)."""
    t = mask.shape[1]
    return (t - 1 - mask.flip(1).long().argmax(1)).clamp(min=0)


class TextClassifier(nn.Module):
    """A zoo decoder's backbone (``model``: embeddings, blocks, final norm) and a head
    (dropout -> linear) on the hidden state of each row's last real token."""

    def __init__(self, lm: nn.Module, n_out: int, drop: float = 0.1):
        super().__init__()
        backbone = getattr(lm, "model", None)
        if backbone is None or not hasattr(backbone, "layers") or not hasattr(backbone, "embed_tokens"):
            raise TypeError(f"expected an mlx_core zoo Transformer, got {type(lm).__name__}")
        self.model = backbone
        self.lm_config = lm.config  # not `config`: export would rebuild it as a language model
        self.head = nn.Sequential(nn.Dropout(drop), nn.Linear(lm.config.hidden_size, n_out))
        p = next(backbone.parameters())
        self.head.to(device=p.device, dtype=p.dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        hidden = self.model(ids, attention_mask=mask)
        pooled = hidden[torch.arange(len(ids), device=ids.device), last_token_index(mask)]
        return self.head(pooled)


def text_splitter(model: TextClassifier, n_block_groups: int = 2) -> list[list[nn.Parameter]]:
    """Layer groups: the embeddings, the blocks cut into ``n_block_groups`` consecutive groups,
    then the final norm with the head."""
    bb = model.model
    layers = list(bb.layers)
    n = max(1, min(n_block_groups, len(layers)))
    embed = [*bb.embed_tokens.parameters()]
    if hasattr(bb, "embed_positions"):
        embed += list(bb.embed_positions.parameters())
    bounds = [round(i * len(layers) / n) for i in range(n + 1)]
    blocks = [[p for layer in layers[a:b] for p in layer.parameters()]
              for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [embed, *[b for b in blocks if b], [*bb.norm.parameters(), *model.head.parameters()]]


def load_lm(model_or_name, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, bool]:
    """A zoo language model and whether it holds trained weights: a ``Transformer`` (as is,
    counted as trained), a ``ModelConfig`` or preset name (random), or a model source name /
    HF directory / GGUF file (``mlx_core.load_model``); with selective recompute applied
    (``mlx_core.transforms.selective_recompute``: less activation memory in training)."""
    model, trained = _lm(model_or_name, dtype)
    from mlx_core.transforms import selective_recompute

    return selective_recompute(model), trained


def _lm(model_or_name, dtype: torch.dtype) -> tuple[nn.Module, bool]:
    from mlx_core import registry
    from mlx_core.config import ModelConfig
    from mlx_core.models.loading import build_model, load_model
    from mlx_core.plugins import load_plugins

    if isinstance(model_or_name, nn.Module):
        return model_or_name, True
    if isinstance(model_or_name, ModelConfig):
        return build_model(model_or_name, dtype=dtype), False
    if not isinstance(model_or_name, str):
        raise TypeError(f"expected a zoo Transformer, a ModelConfig or a model name, got "
                        f"{type(model_or_name).__name__}")
    load_plugins()
    if model_or_name in registry.presets:
        return build_model(registry.presets.get(model_or_name), dtype=dtype), False
    return load_model(model_or_name, dtype=dtype), True


def text_classifier_learner(dls, model_or_name, *, n_out: int | None = None,
                            n_block_groups: int = 2, drop: float = 0.1,
                            freeze: bool | None = None, train_bn: bool = False,
                            dtype: torch.dtype = torch.float32, loss_func=None,
                            **kwargs) -> Learner:
    """A ``Learner`` classifying texts with a zoo language model (see ``load_lm`` for
    ``model_or_name``; e.g. ``"smollm2-135m-instruct"``, or ``"tiny-llama"`` for a random one).

    Layer groups: embeddings, ``n_block_groups`` groups of blocks, final norm + head; use
    ``learn.freeze_to(-k)`` for gradual unfreezing (``fit_gradual``) and ``lr=slice(lo, hi)``.
    ``freeze`` (default: when the weights are trained) starts with only the head training.
    ``train_bn=False``: frozen groups' norm weights freeze too, so a frozen backbone runs no
    backward at all. Other keyword arguments go to ``Learner``."""
    if n_out is None:
        if getattr(dls, "vocab", None) is None:
            raise ValueError("text_classifier_learner: pass n_out= (the DataLoaders have no vocab)")
        n_out = len(dls.vocab)
    lm, trained = load_lm(model_or_name, dtype)
    model = TextClassifier(lm, n_out, drop)
    kwargs.setdefault("splitter", lambda m: text_splitter(m, n_block_groups))
    learn = Learner(dls, model, loss_func or nn.CrossEntropyLoss(), train_bn=train_bn, **kwargs)
    if trained if freeze is None else freeze:
        learn.freeze()
    return learn


def fit_gradual(learn: Learner, epochs: int = 1, lr: float = 1e-2, mult: float = 2.6,
                lr_decay: float = 2.0, **kwargs) -> None:
    """ULMFiT's gradual unfreezing: ``freeze_to(-1)``, ``-2``, ... down to ``unfreeze()``, one
    ``fit_one_cycle(epochs, slice(lr / mult**4, lr))`` per stage, ``lr`` divided by
    ``lr_decay`` after each stage."""
    n = learn.opt.n_groups if learn.opt is not None else len(learn.splitter(learn.model))
    for k in range(1, n + 1):
        learn.freeze_to(-k)
        learn.fit_one_cycle(epochs, slice(lr / mult**4, lr), **kwargs)
        lr /= lr_decay


__all__ = ["PadCollate", "TextClassifier", "TextDataLoaders", "fit_gradual", "last_token_index",
           "load_lm", "text_classifier_learner", "text_splitter"]
