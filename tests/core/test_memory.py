"""mlx_core.memory: the glibc settings that let a training step reuse the last step's memory."""

import subprocess
import sys
import textwrap

import pytest

from mlx_core.memory import OPT_OUT, TCACHE_OFF, _is_glibc, allocator_environment, tcache_is_off

glibc_only = pytest.mark.skipif(not _is_glibc(), reason="the settings are glibc's; elsewhere they are no-ops")


def _python(code: str, env=None) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@glibc_only
def test_the_environment_turns_the_tcache_off_and_keeps_other_tunables():
    env = allocator_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TCACHE_OFF}" and env["X"] == "1"
    assert tcache_is_off(env)
    # a user's own tcache setting wins; opting out changes nothing
    own = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"}
    assert allocator_environment(own) == own
    assert "GLIBC_TUNABLES" not in allocator_environment({OPT_OUT: "system"})
    # tuned=False gives glibc's defaults back to a child, other tunables kept
    plain = allocator_environment(env, tuned=False)
    assert plain["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and not tcache_is_off(plain)
    assert "GLIBC_TUNABLES" not in allocator_environment({"GLIBC_TUNABLES": TCACHE_OFF}, tuned=False)


@glibc_only
def test_relaunch_runs_the_same_command_again_with_the_tcache_off():
    code = """
        import os, sys
        print("run", os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
        from mlx_core.memory import relaunch_with_tuned_allocator
        relaunch_with_tuned_allocator()
        print("after", os.environ.get("GLIBC_TUNABLES"))
    """
    env = allocator_environment(tuned=False)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), "a", "b"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    # the first run prints once and is replaced; the second finds the setting and goes on
    assert done.stdout.splitlines() == ["run None ['a', 'b']", f"run {TCACHE_OFF} ['a', 'b']",
                                        f"after {TCACHE_OFF}"]
    assert _python(code, {**env, OPT_OUT: "system"}).splitlines() == ["run None []", "after None"]


@glibc_only
def test_freed_activations_are_reused_step_after_step():
    """Training-like steps (per layer: GEMM outputs kept for backward, temporaries freed, small
    tensors in between): with the settings the heap never grows after the first step. (Whether
    glibc's defaults grow it depends on the heap's history: 295-435 MiB in a pytest run here,
    flat in a CI run, so only the tuned side is asserted.)"""
    code = """
        import ctypes, sys, torch
        from mlx_core.memory import tune_allocator
        libc = ctypes.CDLL("libc.so.6")
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
        libc.mallinfo2.restype = Info
        if sys.argv[1] == "tuned":
            assert tune_allocator()
        x, w1, w2 = torch.randn(2048, 576), torch.randn(1536, 576), torch.randn(576, 1536)
        heap = []
        for step in range(4):
            saved, h = [], x
            for layer in range(12):
                g = torch.nn.functional.rms_norm(h, (576,)) @ w1.t()
                a = torch.nn.functional.silu(g) * g
                small = [torch.randn(37) for _ in range(20)]
                h = h + a @ w2.t()
                saved += [h, g, small[::5]]
            del saved, h, g, a
            heap.append(libc.mallinfo2().arena >> 20)
        print(*heap)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), "tuned"],
                          capture_output=True, text=True, env=allocator_environment(), timeout=300)
    assert done.returncode == 0, done.stderr
    heap = [int(v) for v in done.stdout.split()]
    assert max(heap[1:]) <= heap[0], heap  # no growth after the first step (it may trim)


def test_only_training_commands_restart_with_the_tuned_allocator():
    from mlx_core.cli.app import trains

    assert trains(["train", "lora_finetune", "model=tiny"]) and trains(["quickstart"])
    assert trains(["bench", "lora"]) and trains(["--verbose", "adapters", "train"])
    assert not trains(["generate", "-p", "hi"]) and not trains(["serve"])
    assert not trains(["bench", "quant"]) and not trains([])
