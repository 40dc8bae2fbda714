"""`cliplens experiment` and `cliplens demo`: the per-stage latency study, reproducible in one command.

corpus (phone-like photos), storage and fakegcs (where the photos are put), targets (one per
storage kind: puts the photos there and says how the service reads them), latency (a loopback
proxy that makes fake GCS answer like a bucket), inprocess (the real service in this process),
load (scenarios and per-request records), report (the tables and everything the commands print),
results (results.json), figure (the PNG), machine (what a run was measured on), study (the
orchestration). See docs/experiment.md.

An optional part: its dependencies are the `experiment` extra (`pip install 'cliplens[experiment]'`),
which the server does not need. The exceptions, which need only the core dependencies: `corpus`
(docker-compose's `photos` step runs it in the server image) and `storage` (the command line's
parser lists its storage kinds for every command).
"""
