from __future__ import annotations

import os
import threading

from edge_agent.ingest.sources.lines import Oversize, chunked_lines


def feed(data: bytes, cap: int, read_size: int = 7) -> list[bytes | Oversize]:
    r, w = os.pipe()

    def writer() -> None:
        os.write(w, data)
        os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    out: list[bytes | Oversize] = []
    for group in chunked_lines(r, cap, read_size=read_size):
        out.extend(group)
    t.join()
    os.close(r)
    return out


def test_lines_blank_lines_and_crlf() -> None:
    assert feed(b"a\n\n  \nbb\r\nccc", cap=10) == [b"a", b"bb", b"ccc"]


def test_oversize_lines_are_skipped_not_buffered() -> None:
    data = b"ok\n" + b"x" * 100 + b"\nfine\n" + b"y" * 50
    assert feed(data, cap=10) == [b"ok", Oversize(100), b"fine", Oversize(50)]


def test_oversize_in_a_single_read() -> None:
    assert feed(b"x" * 20 + b"\nz\n", cap=10, read_size=1 << 16) == [Oversize(20), b"z"]
