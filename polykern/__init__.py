"""polykern: fast PERA and GenLoRA adapters for PyTorch.

``PeraLinear`` / ``GenLoraLinear`` are drop-in ``nn.Linear`` replacements; ``inject_adapters``
puts them into an existing model. On CUDA inputs the compiled ops (``polykern.ops``) run; elsewhere,
or when the extension is not built, the pure-PyTorch reference (``polykern.reference``) does.
``build_info()`` (``python -m polykern info``) says which paths are live here, and why not.
"""

from . import reference
from ._build import build_info
from .export import export_lora
from .models import (adapter_state_dict, count_parameters, inject_adapters,
                     load_adapter_state_dict, load_adapters, merge_and_unload, save_adapters)
from .modules import AdapterLinear, GenLoraLinear, PeraLinear
from .ops import cuda_available, extension_loaded

__version__ = "0.1.0"

__all__ = ["PeraLinear", "GenLoraLinear", "AdapterLinear", "reference", "inject_adapters",
           "merge_and_unload", "adapter_state_dict", "load_adapter_state_dict", "save_adapters",
           "load_adapters", "count_parameters", "cuda_available", "extension_loaded",
           "build_info", "export_lora"]
