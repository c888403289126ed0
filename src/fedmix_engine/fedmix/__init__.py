"""The FedMix method: losses, metrics, pseudo-labels, the local update and aggregation.

Pure functions over tensors and state dicts — no I/O, no network — so that a researcher can read
them beside the paper and the server, the simulator and the Flower adapter all call the same code.
"""
