"""Run configuration: a dataclass schema, YAML loading, `--set` overrides and validation.

A run is fully described by one `Config`. Its modules, each usable on its own:
- schema.py: the dataclasses, one per section, with defaults and valid ranges;
- loading.py: bounded YAML reading, `--set` overrides, typed coercion, `load_config`, saving;
- validate.py: the cross-field rules, one function per section or topic;
- layout.py: `ParallelDims`, the parallel layout resolved once from a config and a world size;
- errors.py: `ConfigError`, the one-line user error the CLI prints (exit code 2).
"""

from llmtrain.config.errors import ConfigError
from llmtrain.config.layout import ParallelDims
from llmtrain.config.loading import (apply_override, config_from_dict, fit_micro_batch,
                                     load_config, parse_override, parse_yaml, read_yaml_file,
                                     save_config)
from llmtrain.config.schema import (GLU_ACTIVATIONS, CheckpointConfig, Config, DataConfig,
                                    LoggingConfig, ModelConfig, MoEConfig, OptimConfig,
                                    ParallelConfig, RopeScalingConfig, TrainConfig)
from llmtrain.config.validate import validate

__all__ = ["GLU_ACTIVATIONS", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "LoggingConfig", "ModelConfig", "MoEConfig", "OptimConfig", "ParallelConfig",
           "ParallelDims", "RopeScalingConfig", "TrainConfig", "apply_override",
           "config_from_dict", "fit_micro_batch", "load_config", "parse_override", "parse_yaml",
           "read_yaml_file", "save_config", "validate"]
