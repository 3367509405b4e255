"""dcpd: a disaggregated-serving daemon for LLM inference with decode context parallelism."""

__version__ = "0.1.0"
