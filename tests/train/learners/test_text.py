"""Text classification on zoo language models: padding and bucketing, pooling of the last real
token (padding-invariant), layer groups, a marker-detection task on a tiny random model, and
(slow) a sentiment-like task on the real built-in model."""

import random

import pytest
import torch

from mlx_train import accuracy
from mlx_train.text import (
    PadCollate,
    TextClassifier,
    TextDataLoaders,
    fit_gradual,
    last_token_index,
    load_lm,
    text_classifier_learner,
    text_splitter,
)

MARKER = 5


def marker_data(n: int, seed: int = 0):
    """Random token sequences (ids 6..127, 4-16 long); label 1 when the marker token 5 is in."""
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for i in range(n):
        length = int(torch.randint(4, 17, (1,), generator=g))
        s = torch.randint(6, 128, (length,), generator=g)
        if i % 2:
            s[int(torch.randint(0, length, (1,), generator=g))] = MARKER
        seqs.append(s.tolist())
        labels.append(i % 2)
    return seqs, labels


def test_pad_collate_and_last_token():
    ids, mask, y = PadCollate(pad_id=9)([([1, 2, 3], 0), ([4], 1)])
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and y.tolist() == [0, 1]
    assert mask.tolist() == [[True] * 3, [True, False, False]]
    left, lmask = PadCollate(pad_id=0, pad_first=True, max_len=2)([([1, 2, 3],), ([4],)])
    assert left.tolist() == [[1, 2], [0, 4]] and lmask.tolist() == [[True, True], [False, True]]
    assert last_token_index(mask).tolist() == [2, 0]
    assert last_token_index(lmask).tolist() == [1, 1]


def test_pooling_is_padding_invariant():
    torch.manual_seed(0)
    lm, trained = load_lm("tiny-llama")
    assert not trained
    model = TextClassifier(lm, n_out=3).eval()
    seqs = [[7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([s])) for s in seqs])
        for pad_first in (False, True):
            ids, mask = PadCollate(pad_id=0, pad_first=pad_first)([(s,) for s in seqs])
            assert torch.allclose(model(ids, mask), alone, atol=1e-5)
        # by hand: the backbone's hidden state at the last token, through the linear head
        ref = model.head[1](lm.model(torch.tensor([seqs[1]]))[0, -1])
        assert torch.allclose(alone[1], ref, atol=1e-5)
    assert not hasattr(model, "config")  # export must not mistake it for a language model


def test_layer_groups_cover_the_model_once():
    torch.manual_seed(0)
    model = TextClassifier(load_lm("tiny-llama")[0], n_out=2)
    groups = text_splitter(model, n_block_groups=2)
    assert len(groups) == 4  # embeddings, block 0, block 1, norm + head
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[0][0] is model.model.embed_tokens.weight
    assert groups[-1][-1] is model.head[1].bias
    assert len(text_splitter(model, n_block_groups=9)) == 4  # at most one group per block


def test_bucketed_loaders_show_batch_and_test_dl(capsys):
    seqs, labels = marker_data(200)
    dls = TextDataLoaders.from_token_ids(seqs, labels, valid_pct=0.2, seed=0, bs=16,
                                         vocab=["absent", "present"])
    assert dls.n_inp == 2 and len(dls.valid.dataset) == 40
    seen = sorted(i for ids, mask, y in dls.train for i in mask.sum(1).tolist())
    assert seen == sorted(len(s) for s, _ in dls.train.dataset)  # every item once, unpadded
    pad = sum(int((~mask).sum()) for _, mask, _ in dls.train)
    flat = TextDataLoaders.from_token_ids(seqs, labels, valid_pct=0.2, seed=0, bs=16,
                                          bucket=False)
    assert pad < 0.5 * sum(int((~mask).sum()) for _, mask, _ in flat.train)
    rows = dls.show_batch(2)
    out = capsys.readouterr().out
    assert len(rows) == 2 and rows[0][0] in ("absent", "present") and rows[0][1] in out
    ids, mask = next(iter(dls.test_dl([[7, 8, 9], [10]])))
    assert ids.tolist() == [[7, 8, 9], [10, 0, 0]] and mask.sum().item() == 4
    with pytest.raises(ValueError, match="no tokenizer"):
        dls.test_dl(["some text"])
    with pytest.raises(ValueError, match="empty token sequences"):
        TextDataLoaders.from_token_ids([[1], []], [0, 1])


def test_marker_detection_on_a_tiny_random_zoo_model():
    seqs, labels = marker_data(1024)
    dls = TextDataLoaders.from_token_ids(seqs, labels, valid_pct=0.2, seed=0, bs=32,
                                         vocab=["absent", "present"])
    torch.manual_seed(0)
    learn = text_classifier_learner(dls, "tiny-llama", metrics=accuracy, progress=False)
    assert learn.opt is None or learn.opt.frozen_idx == 0  # random weights: nothing frozen
    with learn.no_logging():
        learn.fit_one_cycle(5, 1e-2)
    acc = learn.recorder.values[-1][-1]
    print(f"marker detection accuracy (tiny-llama, random init): {acc:.4f}")
    assert acc >= 0.95
    # predict on fresh items of the same task (any single item may be the rare miss: a marker
    # early in a 4-token sequence is the hardest case, and rounding decides it)
    items, truth = marker_data(40, seed=1)
    hits = 0
    for item, want in zip(items, truth, strict=True):
        label, index, probs = learn.predict(item)
        assert label == ["absent", "present"][int(index)] and int(index) == int(probs.argmax())
        assert abs(float(probs.sum()) - 1) < 1e-5
        hits += label == ["absent", "present"][want]
    print(f"predict: {hits} of 40 fresh items right")
    assert hits >= 36, f"predict got {hits} of 40 fresh items right"


def test_gradual_unfreezing_stages():
    seqs, labels = marker_data(64)
    dls = TextDataLoaders.from_token_ids(seqs, labels, valid_pct=0.25, seed=0, bs=16)
    torch.manual_seed(0)
    learn = text_classifier_learner(dls, "tiny-gpt2", freeze=True, progress=False)
    model = learn.model
    body = [*model.model.embed_tokens.parameters(), *model.model.embed_positions.parameters(),
            *model.model.layers.parameters()]
    assert not any(p.requires_grad for p in body)  # train_bn=False: the blocks' norms freeze too
    assert all(p.requires_grad for p in [*model.model.norm.parameters(),
                                         *model.head.parameters()])
    stages = []

    def record():
        stages.append([any(p.requires_grad for p in g) for g in learn.opt.layer_groups])

    from mlx_train import Callback

    with learn.no_logging():
        fit_gradual(learn, epochs=1, lr=1e-2, cbs=Callback(before_fit=record))
    assert stages == [[False, False, False, True], [False, False, True, True],
                      [False, True, True, True], [True, True, True, True]]
    assert len(learn.recorder.values) == 1  # the last stage's history


@pytest.mark.builtin_model
@pytest.mark.slow
def test_sentiment_on_the_builtin_model():
    from mlx_core import load_tokenizer

    rng = random.Random(0)
    good = ["wonderful", "great", "excellent", "delightful", "brilliant", "lovely", "superb"]
    bad = ["terrible", "awful", "boring", "dreadful", "horrible", "disappointing", "poor"]
    things = ["The movie", "This book", "The dinner", "Our trip", "The concert", "The hotel"]
    forms = ["{s} was {a}.", "{s} was really {a}!", "I thought {l} was {a}."]
    texts, labels = [], []
    for i in range(96):
        s = rng.choice(things)
        texts.append(rng.choice(forms).format(s=s, l=s.lower(), a=rng.choice(good if i % 2 else bad)))
        labels.append("positive" if i % 2 else "negative")
    tok = load_tokenizer("smollm2-135m-instruct")
    dls = TextDataLoaders.from_texts(texts, labels, tok, valid_pct=0.25, seed=0, bs=8)
    torch.manual_seed(0)
    learn = text_classifier_learner(dls, "smollm2-135m-instruct", metrics=accuracy,
                                    progress=False)
    assert learn.opt.frozen_idx == 3  # pretrained: only the norm + head group trains
    with learn.no_logging():
        learn.fit_one_cycle(3, 1e-2)
    acc = learn.recorder.values[-1][-1]
    print(f"built-in model sentiment accuracy (head only, 3 epochs): {acc:.4f}")
    assert acc >= 0.85
    assert learn.predict("Our trip was really delightful!")[0] == "positive"
    assert learn.predict("I thought the concert was dreadful.")[0] == "negative"
