"""Training loops of the learned methods (called by each method's ``train``; weights go to Resources/weights)."""
