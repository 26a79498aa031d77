"""Built-in strategies and metrics. Each is a plugin using the same hooks a third party uses."""

DEFAULT_PLUGINS = (
    "optagent.plugins.pruning",
    "optagent.plugins.finetune",
    "optagent.plugins.quantization",
    "optagent.plugins.mixed_precision",
    "optagent.plugins.batch_size",
    "optagent.plugins.runtime",
    "optagent.plugins.metrics",
)
