"""chatai: private OpenAI-compatible LLM serving from a Slurm GPU cluster."""

__version__ = "0.1.0"
