"""Experiments as runnable presets: the demo, Table 1, Figure 7 and the methods comparison."""
