"""Shipped DeepSpeed configs, installed as the package data `megamu.ds_configs` (see megamu/shipped.py)."""
