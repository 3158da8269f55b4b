"""Progress bars: a bar on a terminal, rate-limited plain lines (no carriage returns) anywhere else."""

import io

from crosscoders import progress as P


class _NotATTY(io.StringIO):
    def isatty(self):
        return False


def test_progress_in_a_log_file_is_plain_rate_limited_lines(monkeypatch):
    out = _NotATTY()
    monkeypatch.setattr(P.sys, "stderr", out)
    for _ in P.progress_bar(range(5000), desc="work"):
        pass
    text = out.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert 1 <= len(lines) <= 3 and "5000/5000" in lines[-1]  # 5,000 updates, a few lines at most


def test_progress_disabled_writes_nothing(monkeypatch):
    out = _NotATTY()
    monkeypatch.setattr(P.sys, "stderr", out)
    assert sum(1 for _ in P.progress_bar(range(10), disable=True)) == 10
    assert out.getvalue() == ""
