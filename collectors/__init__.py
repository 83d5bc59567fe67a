"""looptune samplers: host, training jobs, GPUs (NVML); the Prometheus exporter."""
