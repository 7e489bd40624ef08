"""Running as an OS service: systemd and launchd units (`units`), sd_notify (`sdnotify`),
process hardening (`harden`) and who is on the other end of a socket (`peers`).

Must never: change what the broker forwards; these only start, watch and protect the process.
"""
