"""Theory lab: the paper's theorems seen numerically (docs/paper.md §5).

- `problems`, `convex`, `bounds`: FP/SR/R/BC-SGD on the lattice Δ·ℤ on convex problems with a
  known optimum, measured against the bounds of Theorems 1–3;
- `markov`: SR on a bounded grid as an exact Markov chain (Theorems 5–6): stationary law,
  spectral gap and mixing time as the learning rate goes to 0;
- `bop`: Bop (no latent weights; an average m of the gradient moves w one level) on the
  lattice for the convex experiment, and on the chain grids against SR's stationary law;
- `plots` draws the figures, `cli` runs `qtrain theory convex|markov`.

Only `qtrain.quant` is used from the rest of the package.
"""
