"""flame-kd: knowledge distillation of RGB+IR wildfire teachers into RGB-only students, tracked in MLflow."""

__version__ = "0.1.0"
