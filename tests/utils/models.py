"""Tiny architectures shared by the model tests (each forward well under a millisecond)."""

TINY: dict[str, dict[str, object]] = {
    "conv": {"name": "conv", "channels": 8, "hidden": 16, "num_blocks": 2, "max_length": 64},
    "transformer": {
        "name": "transformer",
        "d_model": 16,
        "ffn": 32,
        "num_heads": 2,
        "num_layers": 2,
        "max_length": 64,
    },
}
