"""Cells of notebooks/06_numbers.ipynb."""

from cells.common import _REPO, Cell, code, md

CELLS: list[Cell] = [
    md("""
    # Number representations across snapshots: the helix

    Kantamneni & Tegmark 2025 (*Language Models Use Trigonometry to Do Addition*) find that LLMs
    represent an integer a on a **generalized helix**: a linear term plus Fourier features
    cos/sin(2πa/T) with periods T = 2, 5, 10, 100, fitted to the residual stream through a PCA.
    This notebook fits that helix to a run's snapshots (`numbers.json`, written by the `numbers` stage)
    and asks when, during pre-training, each period appears, beside the step at which the planted
    number mechanisms (counting runs, modular sums) are learned.
    """),
    code(f"""
    %matplotlib inline
    import os
    from pathlib import Path

    import torch

    {_REPO}
    RUN = Path(os.environ.get("FE_RUN", REPO / "runs" / "demo-numbers"))
    """),
    md("""
    ## The method on a planted helix

    A synthetic activation set: the helix basis with periods 5, 10 and 100, through a random linear map
    into 64 dimensions, plus noise. The fit recovers those periods (strength far above the shuffled-number
    null; T = 2, which is not planted, stays under it) and an R² on held-out numbers above every baseline.
    """),
    code("""
    from evolution.numbers.helix import HelixConfig, fit_helix, helix_basis

    g = torch.Generator().manual_seed(0)
    a = torch.arange(100, dtype=torch.float64)
    B = helix_basis(a, [5, 10, 100])
    B = (B - B.mean(0)) / B.std(0)
    X = B @ torch.randn(B.shape[1], 64, generator=g, dtype=torch.float64)
    X += 0.5 * torch.randn(100, 64, generator=g, dtype=torch.float64)
    fit = fit_helix(X, a, HelixConfig(n_null=50, n_random_periods=10))
    print(f"helix R² {fit.helix_r2:.3f} | PCA {fit.pca_r2:.3f} | linear {fit.linear_r2:.3f} | "
          f"random periods {fit.random_periods_r2:.3f} | shuffled null {fit.shuffled_r2_null:.3f}")
    for T, s in fit.strength.items():
        print(f"T = {T:>3}: strength {s:.3f} (null {fit.strength_null[T]:.3f})")
    assert all(fit.strength[T] > fit.strength_null[T] for T in ("5", "10", "100"))
    """),
    md("""
    ## Across snapshots

    Per snapshot: the held-out helix R² at every residual point, each period's strength at the report
    layer (by default the residual stream after block 0, the paper's h⁰) with its null, and the spectrum
    over all periods N/k. A period *emerges* at the first step from which it stays above its null.
    """),
    code("""
    from evolution import load_run

    run = load_run(RUN)
    data = run.numbers
    print("number mechanisms learned at:", data["learned_steps"])
    print("helix above its null from step (per layer):", dict(zip(data["hooks"], data["emergence"]["helix"], strict=True)))
    for T, per_layer in data["emergence"]["periods"].items():
        print(f"T = {T:>3} above its null from step (per layer):", per_layer)
    run.numbers_table().round(3)
    """),
    code("""
    run.plot_numbers()
    """),
]
