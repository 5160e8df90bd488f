"""Shared pieces of the serving tests: a real uvicorn server on a free port, in a thread; a tiny
random model with a byte-level BPE tokenizer (structured outputs need one whose tokens are
bytes, as real models' are)."""

import socket
import threading
import time
from pathlib import Path

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


def start_mlx_serve(args: list[str], log, timeout: float = 120.0):
    """``mlx serve ARGS --host 127.0.0.1 --port <free>`` as a user starts it, output in ``log``;
    ``(process, url)`` once /health answers."""
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlx = Path(sys.executable).parent / "mlx"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(mlx), "serve", *args, "--host", "127.0.0.1", "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, Path(log).read_text()
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return proc, url
        except OSError:
            assert time.monotonic() < deadline, Path(log).read_text()
            time.sleep(0.2)


def spawned_children(pid: int) -> tuple[list[int], list[int]]:
    """The pids of the processes ``pid`` spawned through multiprocessing (replicas, workers),
    and of every process it started (those and multiprocessing's resource tracker)."""
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    return ([c.pid for c in children if "spawn_main" in " ".join(c.cmdline())],
            [c.pid for c in children])


def assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Every process in ``pids`` exits (or is a zombie) within ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        assert time.monotonic() < deadline, f"orphans left running: {alive}"
        time.sleep(0.1)


def wait_for_503(client, model: str, timeout: float = 10.0):
    """Send small completions until the server answers 503 (returned), or has stopped already
    (None); fails after ``timeout`` seconds of other answers."""
    import openai

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.completions.create(model=model, prompt="hi", max_tokens=2)
        except openai.InternalServerError as e:
            assert e.status_code == 503, e
            return e
        except openai.APIConnectionError:
            return None
        assert time.monotonic() < deadline, f"no 503 within {timeout} s"
        time.sleep(0.05)


def assert_a_killed_child_stops_the_server(proc, child: int, started: list[int], client,
                                            model: str, log, names: str) -> None:
    """Kill ``child`` (a replica or a worker) of ``mlx serve`` process ``proc``: new requests get
    503 at once (returned), the server exits 1 within 20 s naming ``names`` in its ``log``, and
    every process it ``started`` is gone."""
    import psutil

    psutil.Process(child).kill()
    error = wait_for_503(client, model)
    assert proc.wait(20) == 1, Path(log).read_text()
    assert_gone(started)
    assert names in Path(log).read_text()
    return error


def assert_sigterm_stops_everything(proc, started: list[int], log) -> None:
    """SIGTERM to ``mlx serve``: uvicorn stops cleanly, then ends by the signal it caught (as a
    shell expects), and every process it ``started`` is gone."""
    import signal

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) in (0, -signal.SIGTERM), Path(log).read_text()
    assert_gone(started)
