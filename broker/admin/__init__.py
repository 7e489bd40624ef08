"""The broker's own endpoints under `/_broker/` (`api`): health, status, metrics, reload.

Must never: answer a request the guard refused, or show a secret.
"""
