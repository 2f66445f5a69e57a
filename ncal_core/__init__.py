"""NCAL: LoRA fine-tuning of Qwen-family LLMs for long-tailed classification with the TC loss."""

__version__ = "0.1.0"
