"""Training for the bmojo zoo: one process, or ``torchrun`` with DDP or FSDP2 (gloo on CPU, NCCL on GPU).

The task is MQAR (:mod:`bmojo.data.mqar`); the model is a zoo preset (:mod:`bmojo.presets`) or a
``config.json``. Everything the run needs is a :class:`TrainConfig`, given as a JSON file and/or
command-line flags (``bmojo train --help``).

=========================================== ==================================================
module                                       holds
=========================================== ==================================================
:mod:`bmojo.train.config`                    ``TrainConfig`` and its checks, the model config it
                                             builds, the ``bmojo train`` flags
:mod:`bmojo.train.distributed`               the process group (torchrun; DDP / FSDP2 via
                                             ``torch.distributed`` only)
:mod:`bmojo.train.checkpoint_io`             atomic checkpoints, resume, the ``final`` export
:mod:`bmojo.train.loop`                      the recipe, the data order and the loop
=========================================== ==================================================

At the end, ``output_dir/final`` names the trained model (``save_pretrained``: safetensors,
config.json, generation_config.json; no Python files), ``mqar.json`` (the training data) and
``eval.json`` (accuracy on the evaluation set, whose ``MQARConfig`` it records); it is swapped in
atomically (see :mod:`bmojo.train.checkpoint_io`). MQAR evaluation itself lives beside the data, in
:func:`bmojo.data.evaluate` (re-exported here).
"""
from ..data.mqar_eval import evaluate
from .checkpoint_io import (FINAL, LATEST, TRAINER_STATE, NonFiniteStateError, export_final, latest_checkpoint,
                            load_model_weights, load_trainer_state, save_checkpoint)
from .config import (DTYPES, TrainConfig, add_train_arguments, build_model_config, check_model_overrides, cmd_train,
                     config_from_args)
from .distributed import DistContext
from .loop import (TrainingDivergedError, early_stop_decision, global_batch_indices, lr_lambda, no_weight_decay,
                   param_groups, train)

__all__ = ["TrainConfig", "train", "evaluate", "early_stop_decision", "save_checkpoint", "latest_checkpoint",
           "load_trainer_state", "load_model_weights", "export_final", "global_batch_indices", "lr_lambda",
           "no_weight_decay", "param_groups", "build_model_config", "check_model_overrides", "add_train_arguments", "config_from_args",
           "cmd_train", "TrainingDivergedError", "NonFiniteStateError", "DistContext", "DTYPES", "TRAINER_STATE",
           "LATEST", "FINAL"]
