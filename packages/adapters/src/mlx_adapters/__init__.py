"""mlx-adapters: PEFT methods on any torch model, in PEFT's API and on-disk format.

Implemented so far: LoRA (incl. rsLoRA, rank/alpha patterns, several named adapters, merge and
unmerge). DoRA, QLoRA, AdaLoRA, IA3, prefix and prompt tuning are still to come.
"""

from mlx_adapters.config import LoraConfig, PeftConfig
from mlx_adapters.lora import LoraLinear
from mlx_adapters.peft_model import PeftModel, get_peft_model

__version__ = "0.1.0"
__all__ = ["LoraConfig", "LoraLinear", "PeftConfig", "PeftModel", "get_peft_model"]
