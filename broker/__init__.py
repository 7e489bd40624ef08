"""agentcard-broker: a local daemon that holds AgentCard credentials for local agents.

This package owns nothing at import time: importing it must stay cheap and side-effect free.
"""

__version__ = "0.1.0"
