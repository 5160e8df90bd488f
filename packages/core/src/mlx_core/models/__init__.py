"""The torch model zoo: one config-driven ``Transformer`` for every family (needs torch)."""
