"""mlx-adapters: PEFT methods on any torch model, in PEFT's API and on-disk format.

LoRA (incl. rsLoRA, DoRA, bias modes, PiSSA/OLoRA init, rank/alpha patterns, several named
adapters, merge and unmerge), QLoRA (LoRA over NF4 base layers, ``quantize_nf4``), AdaLoRA,
(IA)³, prompt tuning and prefix tuning.
"""

from mlx_core.lazy import lazy_exports

# name -> the module that defines it, imported at first access: the plugin entry point imports
# this package at every `mlx` command's start, and these modules import torch (~2 s)
_EXPORTS = {"AdaLoraConfig": "mlx_adapters.adalora", "IA3Config": "mlx_adapters.ia3",
            "IA3Linear": "mlx_adapters.ia3", "LoraLinear": "mlx_adapters.lora",
            "NF4Linear": "mlx_adapters.nf4_linear", "quantize_nf4": "mlx_adapters.nf4_linear",
            "PeftModel": "mlx_adapters.peft_model", "get_peft_model": "mlx_adapters.peft_model",
            "PrefixTuningConfig": "mlx_adapters.prefix_tuning",
            "PromptTuningConfig": "mlx_adapters.prompt_tuning",
            "LoraConfig": "mlx_core.peft_config", "PeftConfig": "mlx_core.peft_config"}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
