"""Built-in corpora."""
