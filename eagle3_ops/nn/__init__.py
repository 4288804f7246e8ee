"""Drop-in modules (see the modules issue)."""
