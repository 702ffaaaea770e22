"""kd: distil large language models into small, fast ones for one domain."""

__version__ = "0.1.0"
