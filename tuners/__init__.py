"""looptune tuners: bottleneck detection, tuner plugins, the control hook."""
