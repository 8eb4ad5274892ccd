"""The personal-data register: tenants, keys, login records, authentication failures."""
