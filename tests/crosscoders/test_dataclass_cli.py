"""Dataclass configs as CLI, and atomic writes."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from crosscoders import io
from crosscoders.dataclass_cli import config_hash, field_docs, from_dict, parse_config, to_dict


@dataclass
class Inner:
    k: int = 4
    """Active latents per token."""


@dataclass
class Cfg:
    lr: float = 1e-3
    """Peak learning rate."""
    activation: Literal["relu", "jumprelu"] = "relu"
    """Sparsity scheme."""
    steps: list[int] = field(default_factory=lambda: [0, 1])
    """Snapshot steps."""
    bf16: bool = False
    """Autocast to bfloat16."""
    inner: Inner = field(default_factory=Inner)
    """Nested table."""
    name: str | None = None
    """Optional name."""


def test_docs_are_help():
    assert field_docs(Cfg)["lr"] == "Peak learning rate."
    assert field_docs(Inner)["k"] == "Active latents per token."


def test_parse_cli_types():
    cfg = parse_config(Cfg, ["--lr", "3e-4", "--activation", "jumprelu", "--steps", "0,2,4", "--bf16", "true"])
    assert cfg.lr == 3e-4 and cfg.activation == "jumprelu" and cfg.steps == [0, 2, 4] and cfg.bf16 is True
    with pytest.raises(ValueError, match="must be one of"):
        parse_config(Cfg, ["--activation", "gelu"])
    with pytest.raises(ValueError, match="expects float"):
        parse_config(Cfg, ["--lr", "fast"])


def test_from_dict_rejects_unknown_and_nests():
    cfg = from_dict(Cfg, {"inner": {"k": 8}})
    assert cfg.inner.k == 8
    with pytest.raises(ValueError, match="unknown Cfg field"):
        from_dict(Cfg, {"lr": 1.0, "lrr": 2.0})
    assert from_dict(Cfg, to_dict(cfg)) == cfg
    assert config_hash(cfg) == config_hash(from_dict(Cfg, to_dict(cfg)))
    assert config_hash(cfg) != config_hash(Cfg())


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    p = tmp_path / "x.json"
    io.write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert '"a": 1' in p.read_text()
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_jsonl_skips_torn_line(tmp_path):
    p = tmp_path / "log.jsonl"
    io.append_jsonl(p, {"step": 1})
    with open(p, "a") as f:
        f.write('{"step": 2, "lo')
    assert io.read_jsonl(p) == [{"step": 1}]
