"""The ``log:`` section of a training config: which trackers mirror the run, and theirs.

```yaml
log:
  to: [tensorboard, mlflow]      # default []: no tracking, the JSONL logs only
  tensorboard: {dir: null}       # null = OUT/tensorboard
  mlflow: {tracking_uri: null, experiment: null, run_name: null, tags: {}}
```
"""

from __future__ import annotations

from pydantic import Field, field_validator

from dpalign.config import Section, one_of
from dpalign.track.mlflow_sink import MLflowConfig
from dpalign.track.sinks import SINKS
from dpalign.track.tensorboard_sink import TensorBoardConfig


class LogConfig(Section):
    to: list[str] = Field(
        default_factory=list,
        description=f"trackers that mirror metrics.jsonl and eval.jsonl ({', '.join(SINKS)}); "
                    "[] = none (needs pip install 'dpalign[track]')")
    tensorboard: TensorBoardConfig = Field(
        default_factory=TensorBoardConfig, description="TensorBoard settings (log.to: "
                                                       "tensorboard)")
    mlflow: MLflowConfig = Field(
        default_factory=MLflowConfig, description="MLflow settings (log.to: mlflow)")

    @field_validator("to")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            one_of("tracker", name, SINKS)
        if len(set(names)) != len(names):
            raise ValueError(f"each tracker once, got {names}")
        return names
