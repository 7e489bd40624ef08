"""The product's helpers, not its core: the local sandbox AgentCard (`sandbox`), the demo,
`connect` (writes an agent host's MCP config) and the stdio bridge (`stdio`).

Must never: be imported by the forwarding path.
"""
