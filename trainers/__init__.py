"""qat.trainers."""
