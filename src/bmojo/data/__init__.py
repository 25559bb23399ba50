"""Synthetic data sets for training and evaluating the zoo, and their evaluation."""
from .mqar import IGNORE_INDEX, MQARConfig, MQARData, answer_mask, count_correct, multiquery_ar, power_law_probs, value_distances
from .mqar_eval import evaluate

__all__ = ["MQARConfig", "MQARData", "multiquery_ar", "power_law_probs", "answer_mask", "count_correct",
           "value_distances", "IGNORE_INDEX", "evaluate"]
