"""`cliplens experiment` and `cliplens demo`: the per-stage latency study, reproducible in one command.

corpus (phone-like photos), storage and fakegcs (where the photos are put), latency (a loopback
proxy that makes fake GCS answer like a bucket), inprocess (the real service in this process),
load (scenarios and per-request records), report (the table), results (results.json), figure
(the PNG), machine (what a run was measured on), study (the orchestration). See docs/experiment.md.
"""
