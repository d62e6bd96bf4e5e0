"""Local Hub servers for the tests: a real olah (downloads) and an upload test double (pushes)."""
