"""MPC fallback (MPyC players and secure aggregation programs) — arrives with the MPC issue.

Security model (to hold when it lands): semi-honest, honest majority (t < m/2, at least 3 players).
"""
