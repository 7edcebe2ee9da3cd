"""The minimal VLM continual-VQA loop (tiny LLaVA, synthetic tasks)."""
