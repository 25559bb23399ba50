"""bmojo: B'MOJO and the models it generalizes (Transformer, sliding-window Transformer, Mamba,
Mamba/attention hybrids) as one Hugging Face model class, with torch, Triton and NKI kernels.

Importing bmojo registers ``model_type="bmojo"`` with AutoConfig, AutoModel and AutoModelForCausalLM.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import ops
from .cache import BMojoCache
from .configuration_bmojo import LAYER_TYPES, BMojoConfig
from .modeling_bmojo import BMojoForCausalLM, BMojoModel, BMojoPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register("bmojo", BMojoConfig, exist_ok=True)
AutoModel.register(BMojoConfig, BMojoModel, exist_ok=True)
AutoModelForCausalLM.register(BMojoConfig, BMojoForCausalLM, exist_ok=True)

__all__ = ["BMojoConfig", "BMojoModel", "BMojoForCausalLM", "BMojoPreTrainedModel", "BMojoCache", "LAYER_TYPES",
           "ops", "__version__"]
