"""Metric modules for ``evaluate.load`` from a local path (see ``modeling_vltp.metrics.tos_metric_path``)."""
