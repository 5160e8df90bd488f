"""The ``mlx`` command line: core's command groups plus those every installed package registers.

What a plugin's commands use from here is ``clean_errors`` (``from mlx_core.cli import
clean_errors``): a known error becomes one ``Error: ...`` line and exit code 1, not a traceback.
"""

from mlx_core.cli.errors import clean_errors

__all__ = ["clean_errors"]
