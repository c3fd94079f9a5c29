"""qat.adapters."""
