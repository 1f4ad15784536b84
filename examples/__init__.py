"""Example networks a user brings: plain ``nn.Module`` code gated with ``models.attach_gates``."""
