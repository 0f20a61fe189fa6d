"""The paper's experiments as runnable presets: the demo, Table 1, Figure 7."""
