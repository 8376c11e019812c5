"""Shipped training configs, installed as the package data `megamu.configs` (see megamu/shipped.py)."""
