"""Planning: typed plans, SQL analysis and compilation, MPC stage specs and bounds, disclosure rules,
and the one set of plan checks that the planner, the owners' agents and the enclave all call.

Imports only the kernel (``sealroom`` outside ``planning``, ``audit`` and ``app``).
"""
