"""PTQ mode: whole-network INT8 quantization config — layer discovery, plan, .cfg, JSON config, API."""
