"""PTQ mode: whole-network INT8 quantization — layer discovery, plan, .cfg, JSON config, API, and calibration."""
