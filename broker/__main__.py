"""`python -m broker`: the same entry point as the `agentcard-broker` console script."""

from broker.cli import main

raise SystemExit(main())
