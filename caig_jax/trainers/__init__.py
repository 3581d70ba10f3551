"""The training engine (`trainer.py`) and what each model needs to be trained and loaded with it."""
