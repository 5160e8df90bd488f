"""The ``mlx`` command line: core's command groups plus those every installed package registers."""
