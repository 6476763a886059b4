"""Progress bars write whole lines, a few per run, when the output is not a terminal."""

import io

from natgrad.progress import LINE_EVERY, Progress


def test_progress_writes_lines_every_few_percent_to_a_file():
    out = io.StringIO()
    for _ in Progress(range(1000), desc="work", file=out, mininterval=0, miniters=1):
        pass
    text = out.getvalue()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line]
    assert 1 / LINE_EVERY <= len(lines) <= 1 / LINE_EVERY + 2  # one per 5%, the start, the end
    assert lines[-1].startswith("work: 100%")


def test_progress_on_a_terminal_is_tqdm():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    for _ in Progress(range(50), desc="work", file=out, mininterval=0, miniters=1):
        pass
    assert out.getvalue().count("\r") >= 50
