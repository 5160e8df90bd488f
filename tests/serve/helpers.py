"""Shared pieces of the serving tests: a real uvicorn server on a free port, in a thread; a tiny
random model with a byte-level BPE tokenizer (structured outputs need one whose tokens are
bytes, as real models' are)."""

import socket
import threading
import time

import uvicorn


class LiveServer:
    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def stop(self):  # what Ctrl-C does in `mlx serve` (server.run_server)
        self.server.config.app.state.engine.abort_all()
        self.server.should_exit = True
        self.thread.join(10)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ['{"color": "red", "count": 3, "ok": true}', "The quick brown fox jumps over the lazy dog.",
          "yes no maybe (555) 123-4567 abc def", '[1, 2, 3] {"a": null}'] * 20


def byte_level_model_dir(directory):
    """A random tiny Llama saved in ``directory`` with a 320-token byte-level BPE tokenizer
    trained on a few JSON-ish lines, and a chat template."""
    import dataclasses

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mlx_core import build_model, get_preset, save_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = dataclasses.replace(get_preset("tiny-llama"), vocab_size=len(tokenizer),
                                 max_position_embeddings=2048)  # room for tool descriptions
    return save_model(build_model(config), directory / "m", tokenizer=tokenizer)
