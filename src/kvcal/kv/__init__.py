"""KV-cache mode: plan, .cfg, JSON config, AMCT-style API and QuantCalibrationOp."""
