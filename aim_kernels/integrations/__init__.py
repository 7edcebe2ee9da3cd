"""Integrations with training frameworks (HF Trainer, distributed): see README."""
