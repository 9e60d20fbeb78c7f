"""Progress: a tqdm bar on a terminal, periodic log lines when the output is a file."""

import logging

from tqdm.auto import tqdm

from mmgen import progress as progress_lib


def test_off_a_terminal_progress_is_log_lines_not_carriage_returns(monkeypatch, caplog, capsys):
    monkeypatch.setattr(progress_lib, "is_terminal", lambda stream=None: False)
    caplog.set_level(logging.INFO, logger="mmgen.progress")
    bar = progress_lib.progress(total=10, desc="train toy", initial=2, every_s=0.0)
    assert isinstance(bar, progress_lib.LogProgress)
    bar.update(3)
    bar.set_postfix(loss="0.1234")
    bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train toy: 5/10 (50%), ")
    assert lines[1].startswith("train toy: 6/10 (60%), ") and lines[1].endswith("loss=0.1234")
    assert "done in" in lines[2] and len(lines) == 3
    assert "\r" not in capsys.readouterr().err  # nothing written by a bar


def test_log_lines_come_at_most_every_interval_and_iteration_works(monkeypatch, caplog):
    monkeypatch.setattr(progress_lib, "is_terminal", lambda stream=None: False)
    monkeypatch.setenv("MMGEN_PROGRESS_SECONDS", "3600")
    caplog.set_level(logging.INFO, logger="mmgen.progress")
    assert list(progress_lib.progress(range(5), desc="eval")) == [0, 1, 2, 3, 4]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and messages[0].startswith("eval: 5/5 (100%)")  # only the closing line within the hour


def test_on_a_terminal_it_is_tqdm(monkeypatch):
    monkeypatch.setattr(progress_lib, "is_terminal", lambda stream=None: True)
    bar = progress_lib.progress(total=3, disable=True)
    assert isinstance(bar, tqdm)
    bar.close()
