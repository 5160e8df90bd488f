"""mlx-adapters: PEFT methods on any torch model, in PEFT's API and on-disk format.

LoRA (incl. rsLoRA, DoRA, bias modes, PiSSA/OLoRA init, rank/alpha patterns, several named
adapters, merge and unmerge), QLoRA (LoRA over NF4 base layers, ``quantize_nf4``), AdaLoRA,
(IA)³, prompt tuning and prefix tuning.
"""

from mlx_adapters.adalora import AdaLoraConfig
from mlx_adapters.ia3 import IA3Config, IA3Linear
from mlx_adapters.lora import LoraLinear
from mlx_adapters.nf4_linear import NF4Linear, quantize_nf4
from mlx_adapters.peft_model import PeftModel, get_peft_model
from mlx_adapters.prefix_tuning import PrefixTuningConfig
from mlx_adapters.prompt_tuning import PromptTuningConfig
from mlx_core.peft_config import LoraConfig, PeftConfig

__version__ = "0.1.0"
__all__ = ["AdaLoraConfig", "IA3Config", "IA3Linear", "LoraConfig", "LoraLinear", "NF4Linear", "PeftConfig",
           "PeftModel", "PrefixTuningConfig", "PromptTuningConfig", "get_peft_model", "quantize_nf4"]
