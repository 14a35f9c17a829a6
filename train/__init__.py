"""The gdnsq-jax training program: configs -> train -> gdnsq_jax."""
