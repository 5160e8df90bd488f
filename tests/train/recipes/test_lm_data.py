"""mlx_train.lm_data: chat-template rendering with response-only labels, batching, packing, text."""

import json

import pytest
import torch

from mlx_core import load_model
from mlx_core.tokenizer import Tokenizer
from mlx_train import CausalLMLoss
from mlx_train.lm_data import (
    IGNORE_INDEX,
    PadCollate,
    instruction_data,
    pack,
    prompt_ids,
    read_jsonl,
    text_folder_data,
    to_messages,
    tokenize_conversation,
)


@pytest.fixture
def tok(tiny_tokenizer):
    return Tokenizer(tiny_tokenizer)


def test_alpaca_and_chat_items_become_the_same_messages():
    alpaca = to_messages({"instruction": "w1", "input": "w2", "output": "w3", "system": "be"})
    chat = to_messages({"messages": [{"role": "system", "content": "be"},
                                     {"role": "user", "content": "w1\n\nw2"},
                                     {"role": "assistant", "content": "w3"}]})
    assert alpaca == chat
    assert to_messages({"instruction": "w1", "output": "w3"})[0]["role"] == "user"  # no system


@pytest.mark.parametrize("item, message", [
    ({"prompt": "x"}, "expected alpaca fields"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\] must be"),
])
def test_bad_items_say_what_is_wrong(item, message):
    with pytest.raises(ValueError, match=message):
        to_messages(item)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_labels_cover_exactly_the_response_and_its_end_token(tok):
    messages = to_messages({"instruction": "w5 w6", "output": "w7 w8"})
    ids, labels = tokenize_conversation(tok, messages)
    text = tok.hf.apply_chat_template(messages, tokenize=False)
    assert ids == tok.encode(text, add_special_tokens=False)       # same ids as the whole text
    trained = [i for i, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=False).split() == ["w7", "w8", "<|im_end|>"]
    assert all(y in (IGNORE_INDEX, i) for i, y in zip(ids, labels, strict=True))
    # the prompt part is what generation is given
    n_prompt = labels.index(next(y for y in labels if y != IGNORE_INDEX))
    assert ids[:n_prompt] == prompt_ids(tok, messages)


def test_multi_turn_trains_every_assistant_turn(tok):
    messages = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"},
                {"role": "user", "content": "w3"}, {"role": "assistant", "content": "w4 w5"}]
    ids, labels = tokenize_conversation(tok, messages)
    trained = tok.decode([y for y in labels if y != IGNORE_INDEX], skip_special_tokens=False)
    assert trained.split() == ["w2", "<|im_end|>", "w4", "w5", "<|im_end|>"]
    assert ids == tok.encode(tok.hf.apply_chat_template(messages, tokenize=False),
                             add_special_tokens=False)


def test_tokenizer_without_template_uses_the_alpaca_format(tiny_tokenizer):
    hf = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer,
                                  unk_token="<unk>", eos_token="<|im_end|>")
    tok = Tokenizer(hf)
    assert not tok.has_chat_template
    ids, labels = tokenize_conversation(tok, to_messages({"instruction": "w1", "output": "w2"}))
    assert tok.decode([y for y in labels if y != IGNORE_INDEX], skip_special_tokens=False) \
        .split() == ["w2", "<|im_end|>"]
    with pytest.raises(ValueError, match="single-turn"):
        tokenize_conversation(tok, [{"role": "user", "content": "w1"},
                                    {"role": "assistant", "content": "w2"},
                                    {"role": "user", "content": "w3"},
                                    {"role": "assistant", "content": "w4"}])


def test_pad_collate_and_truncation(tok):
    rows = [tokenize_conversation(tok, to_messages({"instruction": "w1 " * n, "output": "w2"}),
                                  max_len=12) for n in (1, 6, 20)]
    assert max(len(i) for i, _ in rows) == 12
    ids, mask, labels = PadCollate(pad_id=0)([(torch.tensor(i), torch.tensor(y)) for i, y in rows])
    assert ids.shape == mask.shape == labels.shape == (3, 12)
    assert mask[0].sum() == len(rows[0][0]) and (labels[0][mask[0] == 0] == IGNORE_INDEX).all()


def test_bucketing_batches_similar_lengths(tiny_tokenizer, tmp_path):
    items = [{"instruction": " ".join(["w1"] * (1 + (i * 7) % 40)), "output": "w2"} for i in range(96)]
    path = tmp_path / "varied.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))

    def padding(bucket):
        data = instruction_data(tiny_tokenizer, path, valid_pct=0.1, bs=8, bucket=bucket, seed=0)
        masks = [mask for _, mask, _ in data.dls.train]
        return sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks), data

    bucketed, data = padding(True)
    assert bucketed < padding(False)[0] / 3
    assert [b[0].tolist() for b in data.dls.train] != [b[0].tolist() for b in data.dls.train]
    seeded = instruction_data(tiny_tokenizer, path, valid_pct=0.1, bs=8, seed=0)
    assert [b[0].tolist() for b in seeded.dls.train] == \
        [b[0].tolist() for b in instruction_data(tiny_tokenizer, path, valid_pct=0.1, bs=8, seed=0).dls.train]


def test_packing_fills_rows_and_keeps_the_masks():
    rows = [([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4, 5], [IGNORE_INDEX, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])]
    packed = pack(rows, max_len=4, pad_id=0)
    assert [ids for ids, _ in packed] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert [y for _, y in packed] == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [5, 6, 7, 8],
                                      [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_instruction_data_loaders_and_eval_examples(tiny_tokenizer, tiny_jsonl):
    data = instruction_data(tiny_tokenizer, tiny_jsonl, valid_pct=0.25, bs=8, seed=0)
    assert data.info["train_examples"] == 48 and len(data.eval_examples) == 16
    ids, mask, labels = data.dls.one_batch()
    assert data.dls.n_inp == 2 and ids.shape == labels.shape and ids.dtype == torch.long
    ex = data.eval_examples[0]
    assert ex.messages[-1]["content"] == ex.answer and ex.messages[-1]["role"] == "assistant"
    packed = instruction_data(tiny_tokenizer, tiny_jsonl, valid_pct=0.25, bs=8, packing=True, max_len=32)
    assert packed.dls.one_batch()[0].shape[1] == 32


def test_learner_loss_equals_the_zoo_models_own_loss(tiny_model_dir, tiny_tokenizer, tiny_jsonl):
    """CausalLMLoss on the logits (the Learner's loss) == Transformer(labels=...) (shift inside)."""
    data = instruction_data(tiny_tokenizer, tiny_jsonl, bs=8)
    model = load_model(tiny_model_dir)
    ids, mask, labels = data.dls.one_batch()
    ours = CausalLMLoss()(model(ids, mask), labels)
    assert torch.allclose(ours, model(ids, mask, labels=labels), atol=1e-5)


def test_text_folder_with_a_trained_tokenizer(tmp_path):
    (tmp_path / "texts" / "sub").mkdir(parents=True)
    (tmp_path / "texts" / "a.txt").write_text("the cat sat on the mat. " * 40)
    (tmp_path / "texts" / "sub" / "b.txt").write_text("a dog ran in the fog. " * 40)
    (tmp_path / "texts" / "skip.md").write_text("not text")
    data = text_folder_data(None, tmp_path / "texts", seq_len=16, bs=4, vocab_size=300)
    assert data.info["files"] == 2 and data.tokenizer.vocab_size <= 300
    ids, mask, labels = data.dls.one_batch()
    assert ids.shape == (4, 16) and torch.equal(ids, labels) and mask.all()
    assert data.tokenizer.decode(data.tokenizer.encode("the cat sat")) == "the cat sat"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        text_folder_data(None, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such text folder"):
        text_folder_data(None, tmp_path / "missing")
