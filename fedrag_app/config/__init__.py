"""The one typed run configuration (AppConfig and its sections), validated once, plus what its runtime keys mean
(device, dtype; the torch calls are in core/torch_runtime.py)."""
