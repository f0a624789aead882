"""Milli-Chat model package: importing it registers the `slm` model type with transformers' Auto classes, and marks
the classes for `auto_map`, so save_pretrained copies their code into every saved folder and
`from_pretrained(dir, trust_remote_code=True)` loads it anywhere, without this repository."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_slm import SLMConfig
from .model_slm import SLMForCausalLM, SLMForSequenceClassification, SLMModel

AutoConfig.register("slm", SLMConfig)
AutoModel.register(SLMConfig, SLMModel)
AutoModelForCausalLM.register(SLMConfig, SLMForCausalLM)
AutoModelForSequenceClassification.register(SLMConfig, SLMForSequenceClassification)
SLMConfig.register_for_auto_class()
SLMModel.register_for_auto_class("AutoModel")
SLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SLMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = ["SLMConfig", "SLMModel", "SLMForCausalLM", "SLMForSequenceClassification"]
