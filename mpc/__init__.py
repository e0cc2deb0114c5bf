"""MPC fallback: secure aggregation of the parties' local partial aggregates with MPyC.

Security model: semi-honest, honest majority. MPyC's Shamir secret sharing among m >= 3 players
with threshold t < m/2 (default ``(m - 1) // 2``): any t players together learn nothing beyond
what is opened; t + 1 colluding players learn every input. Players follow the protocol: a
malicious player can change the result. What a peer sends never runs as code (MPyC's pickles carry
plain values only; secure arrays travel as field bytes, see :mod:`mpc.player`), and a peer must
present a certificate naming exactly its own index on both sides of a connection. Helper players
(no input) may be added to reach three players; the plan must state them and the assumption
(:meth:`sealroom.planning.mpc_spec.StageSpec.trust_assumption`). Players talk over mutual TLS
with per-session certificates (:mod:`mpc.tls`).

What is opened, deliberately: the pass/suppress pattern over the public group domain, then only
the requested aggregates of passing groups (see :mod:`mpc.program`). Never a party's own value,
never a value of a suppressed group.

Modules (only :mod:`mpc.player` imports MPyC, and only inside a player process, where it runs
:mod:`mpc.program`; servers may import :mod:`mpc.session`, :mod:`mpc.partials`, :mod:`mpc.result`
and :mod:`mpc.tls`). The stage's public description belongs to the planning layer, which checks
plans without this package:

- :mod:`sealroom.planning.mpc_spec`: ``StageSpec`` (public description of a stage) and its
  derived ``Layout``;
- :mod:`mpc.program`: the secure aggregation program every player runs;
- :mod:`mpc.player`: one player process (``python -m mpc.player SPEC OUT``);
- :mod:`mpc.partials`: ``local_partials(rows, spec, party=...)`` computes a party's ``Partials``
  with DuckDB over the public group domain;
- :mod:`mpc.session`: ``run_session(spec, partials, timeout=...)`` runs all players here;
  ``PlayerProcess`` runs one (a party agent's own player);
- :mod:`mpc.result`: ``MpcResult``, the opened cells, suppressed keys, rule, players and trust
  assumption, canonical and signable;
- :mod:`mpc.tls`: ``SessionCA`` and ``PlayerCredentials``.

See docs/mpc.md.
"""
