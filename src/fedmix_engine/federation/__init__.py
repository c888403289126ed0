"""Federation: the wire format, the aggregation server (``serve``), the site client (``join``).

Transport only: the server aggregates with ``fedmix.aggregation`` and the client trains with
``fedmix.local_update``; neither re-implements them. Pixels never cross the wire — only the
pair's weights and a small JSON report (sample count, losses, counts).
"""
