"""The zoo's presets (docs/design.md, "The model family"), in three parts:

* :mod:`bmojo.presets.recipes` — the members, the paper's sizes and :func:`preset_config`;
* :mod:`bmojo.presets.accounting` — what a config costs: parameters, decode-time state, FLOPs and the
  recall study's memory budget;
* :mod:`bmojo.presets.cards` — model cards, the ``bmojo presets`` table and the writer of
  ``checkpoints/<member>-<size>/`` (``python -m bmojo.presets --write checkpoints``: config.json and a
  README.md per preset, no weights and no Python files).

Every public name of the three is importable from here.
"""
from .accounting import (forward_flops, layer_param_count, layer_state_nbytes, param_count, recall_memory_floats,
                         state_nbytes)
from .cards import DESCRIPTIONS, PRESET_FILES, model_card, preset_config_json, preset_table, write_preset_configs
from .recipes import MEMBERS, NOMINAL_PARAMS, PAPER_SIZES, SIZES, member_layer_types, preset_config, preset_depth, preset_names

__all__ = ["MEMBERS", "SIZES", "PAPER_SIZES", "NOMINAL_PARAMS", "DESCRIPTIONS", "PRESET_FILES", "member_layer_types",
           "preset_depth", "preset_config", "preset_names", "layer_param_count", "param_count", "layer_state_nbytes",
           "state_nbytes", "recall_memory_floats", "forward_flops", "model_card", "preset_table",
           "preset_config_json", "write_preset_configs"]
