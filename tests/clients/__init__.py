"""Third-party clients run against oaimux: the harness (test side) and the driver scripts (client side)."""
