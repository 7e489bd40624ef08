"""The broker's own endpoints under `/_broker/` (`api`: health, status, metrics, reload), and the
small client the command line asks a running daemon with (`client`).

Must never: answer a request the guard refused, or show a secret.
"""
