"""The HTTP/1.1 engine: the agents' side (`server`), the upstream side (`client`) and what both
refuse on top of llhttp (`framing`).

Owns: bytes on the wire in both directions. Must never: know about routes, credentials,
policies or AgentCard; the pipeline above it decides all of that.
"""
