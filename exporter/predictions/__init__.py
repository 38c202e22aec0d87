"""The prediction side: stores and reflection, the pushed-down queries, the per-model refresher."""
