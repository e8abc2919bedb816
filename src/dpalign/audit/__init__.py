"""Privacy auditing: an empirical lower bound on epsilon from one training run.

``canaries`` makes the canaries (gradient: Dirac units in an audit vector; input: unique
preference pairs), ``bound`` turns their scores into the one-run lower bound of Steinke,
Nasr & Jagielski (2023) and membership-inference figures, ``run`` trains a configured run
with canaries and writes ``audit.json``; ``faults`` holds deliberately broken DP steps for
tests.
"""
