"""Drive a command in a pseudo terminal, as a person at a keyboard would (a small pexpect on the
stdlib's pty module): type lines, wait for text to appear, read the exit code."""

from __future__ import annotations

import codecs
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Mapping, Sequence

# CSI and OSC sequences, charset selection and keypad modes: what rich and readline add around text.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>]"
)


def plain(text: str) -> str:
    """text without terminal escape sequences and carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


class PtySession:
    """One child process whose stdin, stdout and stderr are a terminal 100 columns wide."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        environ = dict(os.environ if env is None else env)
        environ.update({"TERM": "xterm-256color", "COLUMNS": "100", "LINES": "40"})
        environ.pop("NO_COLOR", None)
        # util-linux's setsid starts a session and makes the pty its controlling terminal, so
        # Ctrl-C sends SIGINT to the child, then execs the command (same pid). Not preexec_fn:
        # that forces a plain fork(), which runs gRPC's fork handlers while this test process's
        # gRPC threads are busy (the child then hung); without it subprocess uses vfork.
        self.process = subprocess.Popen(
            ["setsid", "--ctty", *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=environ,
        )
        os.close(slave)  # the child holds it now; reads see EIO once it exits
        self.master = master
        self._raw = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.output = ""  # everything read so far, escape sequences removed
        self._seen = 0  # expect() searches from here

    def sendline(self, text: str = "") -> None:
        os.write(self.master, text.encode() + b"\r")

    def send_interrupt(self) -> None:
        """Ctrl-C."""
        os.write(self.master, b"\x03")

    def send_eof(self) -> None:
        """Ctrl-D at the start of a line."""
        os.write(self.master, b"\x04")

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until pattern appears in the output after the last match; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self._seen)
            if match:
                self._seen = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                raise AssertionError(
                    f"{pattern!r} did not appear; output after the last match:\n"
                    f"{self.output[self._seen :]}"
                )

    def wait(self, timeout: float = 30.0) -> int:
        """Read the rest of the output and return the exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(deadline - time.monotonic()):
            pass
        return self.process.wait(timeout=max(deadline - time.monotonic(), 1.0))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)

    def _read(self, timeout: float) -> bool:
        """Read what is available within timeout; False at end of output or timeout."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child exited and closed the terminal
            return False
        if not data:
            return False
        # Stripped as a whole: an escape sequence may be split between two reads.
        self._raw += self._decoder.decode(data)
        self.output = plain(self._raw)
        return True


def chatfleet(*args: str) -> list[str]:
    """argv running `chatfleet ARGS` with this interpreter."""
    return [sys.executable, "-m", "services.cli.main", *args]
