"""Per-architecture kernel tuning and a tuning cache that machines and teams share.

devices.py   GPU table (SMs, shared memory, HBM bandwidth, peak TFLOP/s per dtype)
space.py     candidates from the templates' meta-parameters, pruned per architecture
costmodel.py roofline + occupancy estimate: ranks candidates without a GPU
search.py    exhaustive, random and TPE (Optuna) strategies under a budget
buckets.py   shape buckets (tokens in powers of two, context ranges), nearest-bucket match
records.py   a tuning record: data with its provenance, validated, JSON only
store.py     the local SQLite (WAL) store and its graded lookup
sharing.py   bundles (export/import/merge) and a team Redis server (push/pull, fail-open)
problems.py  what there is to tune in a graph; choose.py picks configs at compile time;
tune.py      `v4c tune`; inputs.py builds well-formed inputs to measure a kernel
"""
