"""Progress bars stay off non-interactive outputs (a log must not fill with carriage returns)."""
import io

from pamfx.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def drain(stream, enabled: bool = True) -> str:
    for _ in progress_bar(range(2000), file=stream, enabled=enabled, mininterval=0, miniters=1):
        pass
    return stream.getvalue()


def test_a_log_file_gets_no_progress_output():
    assert drain(io.StringIO()) == ""


def test_a_terminal_gets_a_bar_unless_disabled():
    assert "2000/2000" in drain(Terminal())
    assert drain(Terminal(), enabled=False) == ""
