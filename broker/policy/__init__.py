"""Route policies: the limits a user sets that an agent cannot talk its way past.

`route.RoutePolicy` is the request hook (rules, tools, amounts, budget, rate); `rules` holds
the pure matching functions; `budget.BudgetLedger` keeps what was spent across restarts.
Must never: be called by the forwarding core; the pipeline registers policies as hooks.
"""
