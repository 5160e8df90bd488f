"""`mlx bench lora` runs both sides from the same initial adapter; their losses agree."""

import pytest

from mlx_adapters import bench

pytestmark = [pytest.mark.builtin_model, pytest.mark.hf_parity, pytest.mark.slow]


def test_both_sides_train_from_the_same_adapter(builtin_model_dir):
    result = bench.run(batch=1, seq=32, steps=2)
    assert result["mlx"]["median_step_s"] > 0 and result["hf_peft"]["peak_rss_mib"] > 0
    # same weights, same adapter, same batch, same optimiser: the losses agree to fp32 noise
    assert result["max_loss_difference"] < 1e-4
