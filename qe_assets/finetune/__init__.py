"""Fine-tuning backends behind one entry point, and the registry of their runs."""
