"""Milli-Chat model package: importing it registers the `slm` model type with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .configuration_slm import SLMConfig
from .model_slm import SLMForCausalLM, SLMForSequenceClassification, SLMModel

AutoConfig.register("slm", SLMConfig)
AutoModel.register(SLMConfig, SLMModel)
AutoModelForCausalLM.register(SLMConfig, SLMForCausalLM)
AutoModelForSequenceClassification.register(SLMConfig, SLMForSequenceClassification)

__all__ = ["SLMConfig", "SLMModel", "SLMForCausalLM", "SLMForSequenceClassification"]
