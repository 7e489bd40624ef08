"""The HTTP/1.1 engine, both sides on llhttp (httptools).

The agents' side: `server` (the connection Protocol and the listeners) hands `agent_messages`
(a request, its body, the answers written back) to one handler. The upstream side: `client`
(the pool) writes requests on `connection` (the Protocol reading answers), which feeds each
answer to `upstream_answer`. `framing` is what both sides refuse on top of llhttp.

Owns: bytes on the wire in both directions. Must never: know about routes, credentials,
policies or AgentCard; the pipeline above it decides all of that.
"""
