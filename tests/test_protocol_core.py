"""The sans-IO NBD core: the same conversation split at every byte boundary gives the same result,
and arbitrary bytes never raise anything but the protocol's own errors."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockdev.nbd import proto as P
from blockdev.nbd.handshake import Closed, ExportInfo, Negotiated, ServerHandshake
from blockdev.nbd.transmission import REQ, ProtocolError, RequestParser, validate

EXPORTS = {"disk": ExportInfo(name="disk", size=1 << 20, writable=True, description="d")}


def _hs() -> ServerHandshake:
    return ServerHandshake(EXPORTS.get, lambda: sorted(EXPORTS))


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data


def _go(name: str, infos: tuple[int, ...] = (P.INFO_BLOCK_SIZE,), opt: int = P.OPT_GO) -> bytes:
    raw = name.encode()
    return _opt(opt, struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos))


def _meta(name: str, *queries: str, opt: int = P.OPT_SET_META_CONTEXT) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q.encode()
    return _opt(opt, body)


def _replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, data) of every option reply in ``out``."""
    res, pos = [], 0
    while pos < len(out):
        magic, opt, rep, n = struct.unpack_from(">QIII", out, pos)
        assert magic == P.OPT_REPLY_MAGIC
        res.append((opt, rep, out[pos + 20:pos + 20 + n]))
        pos += 20 + n
    return res


def _run(chunks: list[bytes]) -> tuple[bytes, Negotiated | Closed | None]:
    hs = _hs()
    out = hs.data_to_send()
    result = None
    for i, c in enumerate(chunks):
        result = hs.receive_data(c)
        out += hs.data_to_send()
        if result is not None:
            if isinstance(result, Negotiated):  # what the client sent after GO belongs to transmission
                rest = result.leftover + b"".join(chunks[i + 1:])
                result = Negotiated(result.export, result.structured, result.base_allocation, rest)
            break
    return out, result


FULL = (struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES) + _opt(P.OPT_LIST) + _opt(0xBEEF)
        + _opt(P.OPT_STRUCTURED_REPLY) + _meta("disk", "base:allocation") + _go("nope") + _go("disk")
        + REQ.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, 7, 0, 0))


def test_handshake_negotiates_go_with_structured_replies_and_base_allocation() -> None:
    out, result = _run([FULL])
    assert out[:16] == struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT)
    assert isinstance(result, Negotiated)
    assert result.export.name == "disk" and result.structured and result.base_allocation
    assert result.leftover == REQ.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, 7, 0, 0)
    reps = _replies(out[18:])
    assert (P.OPT_LIST, P.REP_SERVER, struct.pack(">I", 4) + b"disk") in reps
    assert (0xBEEF, P.REP_ERR_UNSUP) in [(o, r) for o, r, _ in reps]
    assert (P.OPT_GO, P.REP_ERR_UNKNOWN) in [(o, r) for o, r, _ in reps]
    infos = [d for o, r, d in reps if r == P.REP_INFO]
    size_flags = next(d for d in infos if struct.unpack_from(">H", d)[0] == P.INFO_EXPORT)
    _, size, flags = struct.unpack(">HQH", size_flags)
    assert size == 1 << 20 and flags & P.TFLAG_SEND_DF and not flags & P.TFLAG_READ_ONLY
    bs = next(d for d in infos if struct.unpack_from(">H", d)[0] == P.INFO_BLOCK_SIZE)
    assert struct.unpack(">HIII", bs)[1:] == (1, 4096, P.MAX_PAYLOAD)


def test_handshake_split_at_every_byte_boundary_gives_the_same_result() -> None:
    whole_out, whole = _run([FULL])
    for i in range(1, len(FULL)):
        out, result = _run([FULL[:i], FULL[i:]])
        assert result == whole and out == whole_out, f"split at {i}"


def test_byte_at_a_time_handshake() -> None:
    out, result = _run([FULL[i:i + 1] for i in range(len(FULL))])
    assert isinstance(result, Negotiated) and out == _run([FULL])[0]


def test_export_name_option_sends_size_and_zero_padding() -> None:
    out, result = _run([struct.pack(">I", P.FLAG_FIXED_NEWSTYLE) + _opt(P.OPT_EXPORT_NAME, b"disk")])
    assert isinstance(result, Negotiated) and not result.structured
    assert len(out) == 18 + 8 + 2 + 124


def test_unknown_export_name_closes_and_abort_acks() -> None:
    _, result = _run([struct.pack(">I", 1) + _opt(P.OPT_EXPORT_NAME, b"missing")])
    assert isinstance(result, Closed)
    out, result = _run([struct.pack(">I", 1) + _opt(P.OPT_ABORT)])
    assert isinstance(result, Closed) and _replies(out[18:]) == [(P.OPT_ABORT, P.REP_ACK, b"")]


def test_bad_client_flags_and_bad_option_magic_close() -> None:
    assert isinstance(_run([struct.pack(">I", 0x80)])[1], Closed)
    assert isinstance(_run([struct.pack(">I", 1) + b"X" * 16])[1], Closed)


def test_oversized_option_is_skipped_with_too_big_and_negotiation_continues() -> None:
    big = struct.pack(">QII", P.IHAVEOPT, P.OPT_GO, P.MAX_OPTION + 1) + bytes(P.MAX_OPTION + 1)
    out, result = _run([struct.pack(">I", 1) + big + _go("disk")])
    assert isinstance(result, Negotiated)
    assert _replies(out[18:])[0][:2] == (P.OPT_GO, P.REP_ERR_TOO_BIG)


def test_meta_context_requires_structured_replies_and_malformed_go_is_invalid() -> None:
    out, _ = _run([struct.pack(">I", 1) + _meta("disk", "base:allocation") + _opt(P.OPT_GO, b"\0\0")])
    reps = _replies(out[18:])
    assert [r for _, r, _ in reps] == [P.REP_ERR_INVALID, P.REP_ERR_INVALID]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_handshake_never_crashes_on_garbage(data: bytes, step: int) -> None:
    hs = _hs()
    for i in range(0, len(data), step):
        if hs.receive_data(data[i:i + step]) is not None:
            break
        hs.data_to_send()


# -- transmission ---------------------------------------------------------------------------------
def _req(cmd: int, handle: int, offset: int, length: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return REQ.pack(P.REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload


STREAM = (_req(P.CMD_WRITE, 1, 0, 5, P.CMD_FLAG_FUA, b"hello") + _req(P.CMD_READ, 2, 0, 4096)
          + _req(P.CMD_WRITE, 3, 512, 3, 0, b"abc") + _req(P.CMD_FLUSH, 4, 0, 0) + _req(P.CMD_DISC, 5, 0, 0))


def _parse_all(chunks: list[bytes]) -> list[tuple]:
    parser, buf, out = RequestParser(), bytearray(), []
    for c in chunks:
        buf += c
        view = memoryview(buf)
        reqs, used, need = parser.parse(view)
        out += [(cmd, fl, h, off, n, bytes(p) if p is not None else None, e) for cmd, fl, h, off, n, p, e in reqs]
        del reqs
        view.release()
        del buf[:used]
        assert need > 0
    assert not buf
    return out


def test_parser_split_at_every_byte_boundary() -> None:
    whole = _parse_all([STREAM])
    assert [r[2] for r in whole] == [1, 2, 3, 4, 5] and whole[0][5] == b"hello" and whole[0][1] == P.CMD_FLAG_FUA
    for i in range(1, len(STREAM)):
        assert _parse_all([STREAM[:i], STREAM[i:]]) == whole, f"split at {i}"


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 100])
def test_parser_returns_at_most_limit_requests_and_resumes_where_it_stopped(limit: int) -> None:
    whole = _parse_all([STREAM])
    parser, view, out = RequestParser(), memoryview(STREAM), []
    while view:
        reqs, used, _need = parser.parse(view, limit)
        assert len(reqs) <= limit and (reqs or not used)
        out += [(r[0], r[1], r[2], r[3], r[4], bytes(r[5]) if r[5] is not None else None, r[6]) for r in reqs]
        view = view[used:]
        if not reqs:
            break
    assert out == whole


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM)), min_size=1, max_size=12))
def test_parser_any_split(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True) if b > a]
    assert _parse_all(chunks) == _parse_all([STREAM])


def test_oversized_write_payload_is_discarded_and_the_stream_stays_in_sync() -> None:
    parser = RequestParser(max_payload=16)
    stream = _req(P.CMD_WRITE, 1, 0, 40, 0, b"z" * 40) + _req(P.CMD_READ, 2, 0, 8)
    reqs, used, _ = parser.parse(memoryview(stream[:50]))
    assert reqs == [(P.CMD_WRITE, 0, 1, 0, 40, None, P.EINVAL)] and used == 50
    reqs, used, _ = parser.parse(memoryview(stream[50:]))
    assert [r[2] for r in reqs] == [2]


def test_bad_magic_is_a_protocol_error() -> None:
    try:
        RequestParser().parse(memoryview(b"\0" * 28))
    except ProtocolError as e:
        assert "magic" in str(e)
    else:
        raise AssertionError("bad magic accepted")


def test_validate_checks_bounds_read_only_flags_and_sizes() -> None:
    size = 1 << 20
    assert validate(P.CMD_READ, 0, size - 10, 10, size, True, False) == 0
    assert validate(P.CMD_READ, 0, size - 10, 11, size, True, False) == P.EINVAL
    assert validate(P.CMD_TRIM, 0, size - 10, 11, size, True, False) == P.EINVAL
    assert validate(P.CMD_WRITE, 0, 0, 10, size, False, False) == P.EPERM
    assert validate(P.CMD_TRIM, 0, 0, 10, size, False, False) == P.EPERM
    assert validate(P.CMD_WRITE, P.CMD_FLAG_NO_HOLE, 0, 1, size, True, False) == P.EINVAL
    assert validate(99, 0, 0, 0, size, True, False) == P.EINVAL
    assert validate(P.CMD_BLOCK_STATUS, 0, 0, 512, size, True, False) == P.EINVAL
    assert validate(P.CMD_BLOCK_STATUS, 0, 0, 512, size, True, True) == 0


@pytest.mark.parametrize("flags", [0, P.CMD_FLAG_DF])
def test_read_over_the_maximum_payload_is_einval_never_eoverflow(flags: int) -> None:
    # The spec: over the advertised maximum -> EINVAL (SHOULD); EOVERFLOW only for a DF read that cannot
    # be sent unfragmented, and every read of ours is one chunk.
    assert validate(P.CMD_READ, flags, 0, P.MAX_PAYLOAD + 1, 1 << 40, True, False) == P.EINVAL
    assert validate(P.CMD_READ, flags, 0, P.MAX_PAYLOAD, 1 << 40, True, False) == 0


@pytest.mark.parametrize("cmd", [P.CMD_WRITE, P.CMD_WRITE_ZEROES])
def test_writes_past_the_end_are_enospc(cmd: int) -> None:
    # The spec's SHOULD for write requests beyond the device (reads and trims stay EINVAL).
    size = 1 << 20
    assert validate(cmd, 0, size - 10, 11, size, True, False) == P.ENOSPC
    assert validate(cmd, 0, 2**64 - 512, 1024, size, True, False) == P.ENOSPC
    assert validate(cmd, 0, size - 10, 11, size, False, False) == P.EPERM


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_crashes_on_garbage(data: bytes) -> None:
    try:
        RequestParser(max_payload=64).parse(memoryview(data))
    except ProtocolError:
        pass
