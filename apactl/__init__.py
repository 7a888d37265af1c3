"""apactl: fine-tune language models from feedback with APA, PPO and AWR."""

__version__ = "0.1.0"
