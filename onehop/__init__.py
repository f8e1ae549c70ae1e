"""onehop: a gRPC mesh for the data and model roles of an ML system."""

__version__ = "0.1.0"
