"""megamu: DeepSpeed/Megatron-style LLM pretraining with tested μP and loss prediction."""
__version__ = "0.1.0"
