"""The trainer: training jobs over the data plane, the model registry, and OIP v2 inference."""
