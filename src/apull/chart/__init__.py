"""The chart charts/apull: its installer image, and what that image runs in the cluster."""
