"""The controller's side of Kubernetes: one client (kubectl) and what is built on it."""
