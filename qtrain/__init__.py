"""qtrain: training neural networks with binary and low-bit weights.

Implements the methods compared by Li et al., "Training Quantized Nets: A Deeper
Understanding" (NeurIPS 2017): BinaryConnect (BC), stochastic rounding (SR) and deterministic
rounding (R) over SGD and Adam, with the paper's networks, data sets and experiments.
"""

__version__ = "0.1.0"
