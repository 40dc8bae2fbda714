"""The work: sources, decode, preprocess, batcher, model and the service that joins them.

Nothing here imports Litestar, so the pipeline can be driven from a test or a script.
"""
