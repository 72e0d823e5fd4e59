"""The ``peft-jax`` command."""
