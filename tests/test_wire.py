"""The replication protocol core, without sockets: handshake, auth, frames split at every byte, garbage."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirror.wire import AuthError, Connection, PeerError, RemoteProtocolError, Role, State, WireError, codec
from mirror.wire.events import (
    PROTOCOL_VERSION,
    Ack,
    Auth,
    Bye,
    Challenge,
    Checkpoint,
    ErrorMsg,
    Flush,
    HashQuery,
    HashReply,
    Hello,
    Ping,
    Welcome,
    Write,
    Zero,
)

UUID = "0b0e5d4e-6a43-4f0e-9d57-6d2a7f1c1e11"


def hello(version: int = PROTOCOL_VERSION, size: int = 1 << 20, mode: str = "sync") -> Hello:
    return Hello(version, UUID, "vol", size, 4096, 1, b"", mode, ())


def counter_rand(seed: int):  # deterministic nonces
    c = itertools.count(seed)
    return lambda n: bytes([next(c) % 256]) * n


def pump(a: Connection, b: Connection, split: int | None = None) -> list:
    """Move a's output into b, optionally in pieces of ``split`` bytes; b's events."""
    data = a.data_to_send()
    events = []
    step = split or max(1, len(data))
    for i in range(0, len(data), step):
        b.receive_data(data[i:i + step])
        events += b.next_events()
    return events


def handshake(src_key: bytes | None, tgt_key: bytes | None, split: int | None = None, mode: str = "sync"):
    src = Connection(Role.SOURCE, src_key, randbytes=counter_rand(1))
    tgt = Connection(Role.TARGET, tgt_key, randbytes=counter_rand(100))
    src.start(hello(mode=mode))
    assert pump(src, tgt, split) == []  # the target keeps the hello until the source authenticates
    assert pump(tgt, src, split) == []
    evs = pump(src, tgt, split)
    assert len(evs) == 1 and isinstance(evs[0], Hello) and evs[0].volume_uuid == UUID
    tgt.accept(Welcome("rid", "vol", True, 1))
    evs = pump(tgt, src, split)
    assert evs == [Welcome("rid", "vol", True, 1)]
    assert src.state is State.READY and tgt.state is State.READY
    return src, tgt


@pytest.mark.parametrize("key", [None, b"secret"])
def test_handshake_completes_with_and_without_key(key):
    handshake(key, key)


@given(split=st.integers(min_value=1, max_value=400))
@settings(max_examples=60, deadline=None)
def test_handshake_survives_any_split(split):
    handshake(b"k", b"k", split)


def test_wrong_key_is_refused_on_both_sides():
    src = Connection(Role.SOURCE, b"right")
    tgt = Connection(Role.TARGET, b"wrong")
    src.start(hello())
    pump(src, tgt)
    with pytest.raises(AuthError, match="wrong pre-shared key"):
        pump(tgt, src)
    with pytest.raises(PeerError, match="wrong pre-shared key"):
        pump(src, tgt)  # the source's ErrorMsg tells the target why
    assert src.state is State.CLOSED and tgt.state is State.CLOSED


def test_forged_source_proof_is_refused_by_target():
    from mirror.wire.events import Auth

    tgt = Connection(Role.TARGET, b"key")
    src = Connection(Role.SOURCE, b"key")
    src.start(hello())
    pump(src, tgt)
    tgt.data_to_send()
    tgt.receive_data(codec.encode(Auth(b"\0" * 32)))
    with pytest.raises(AuthError, match="source's proof"):
        tgt.next_events()


@pytest.mark.parametrize("src_key,tgt_key,msg", [(None, b"k", "requires a pre-shared key"),
                                                 (b"k", None, "target has none")])
def test_key_on_one_side_only_is_refused(src_key, tgt_key, msg):
    src = Connection(Role.SOURCE, src_key)
    tgt = Connection(Role.TARGET, tgt_key)
    src.start(hello())
    pump(src, tgt)
    with pytest.raises(AuthError, match=msg):
        pump(tgt, src)
    with pytest.raises(PeerError, match=msg):
        pump(src, tgt)


def test_version_mismatch_is_reported_to_both_sides():
    src = Connection(Role.SOURCE)
    tgt = Connection(Role.TARGET)
    src.start(hello(version=PROTOCOL_VERSION + 1))
    with pytest.raises(RemoteProtocolError, match="version mismatch"):
        pump(src, tgt)
    with pytest.raises(PeerError, match="version mismatch"):
        pump(tgt, src)


def data_stream(n: int, checkpoints: bool = False) -> tuple[bytes, list]:
    frames = []
    out = []
    for i in range(1, n + 1):
        kind = i % 4
        if checkpoints and i % 5 == 0:
            ev = Checkpoint(i, 1000 + i, i * 10**9)
        elif kind == 0:
            ev = Write(i, i * 4096, memoryview(bytes([i % 256]) * (i * 37 % 9000 + 1)), fua=bool(i % 3))
        elif kind == 1:
            ev = Zero(i, i * 512, 65536, fua=False, trim=bool(i % 2))
        elif kind == 2:
            ev = Flush(i)
        else:
            ev = Write(i, 0, memoryview(b"x" * 5), False)
        frames.append(codec.encode(ev))
        out.append(ev)
    out.append(Ping(7))
    frames.append(codec.encode(Ping(7)))
    return b"".join(frames), out


def same(a, b) -> bool:
    if isinstance(a, Write):
        return isinstance(b, Write) and (a.seq, a.offset, bytes(a.data), a.fua) == (b.seq, b.offset, bytes(b.data), b.fua)
    return a == b


@given(split=st.integers(min_value=1, max_value=20000), n=st.integers(min_value=1, max_value=30),
       mode=st.sampled_from(["sync", "async"]))
@settings(max_examples=80, deadline=None)
def test_data_frames_parse_identically_at_every_split(split, n, mode):
    _, tgt = handshake(None, None, mode=mode)
    data, want = data_stream(n, checkpoints=mode == "async")
    got = []
    for i in range(0, len(data), split):
        tgt.receive_data(data[i:i + split])
        for ev in tgt.next_events():
            # Views are only valid until the next receive: copy what we compare.
            got.append(Write(ev.seq, ev.offset, memoryview(bytes(ev.data)), ev.fua) if isinstance(ev, Write) else ev)
    assert len(got) == len(want) and all(same(a, b) for a, b in zip(got, want))


def test_every_byte_boundary_of_a_small_conversation():
    data, want = data_stream(11, checkpoints=True)
    for cut in range(1, len(data)):
        _, tgt = handshake(None, None, mode="async")
        tgt.receive_data(data[:cut])
        first = [bytes(e.data) if isinstance(e, Write) else e for e in tgt.next_events()]
        tgt.receive_data(data[cut:])
        rest = [bytes(e.data) if isinstance(e, Write) else e for e in tgt.next_events()]
        assert len(first) + len(rest) == len(want)


def test_acks_and_hash_replies_reach_the_source():
    src, tgt = handshake(None, None)
    src.receive_data(codec.encode_ack(41) + codec.encode(HashReply(3, b"a" * 32)))
    assert src.next_events() == [Ack(41), HashReply(3, b"a" * 32)]
    tgt.receive_data(codec.encode(HashQuery(1, 65536, 2, (0, 5))))
    assert tgt.next_events() == [HashQuery(1, 65536, 2, (0, 5))]


def test_a_flipped_bit_anywhere_is_caught_and_reported():
    frame = b"".join(bytes(x) for x in codec.encode_write(1, 4096, b"payload" * 100))
    for pos in range(0, len(frame), 7):
        _, tgt = handshake(None, None)
        bad = bytearray(frame)
        bad[pos] ^= 0x10
        tgt.receive_data(bytes(bad))
        with pytest.raises(RemoteProtocolError):
            tgt.next_events()  # never a Write with wrong bytes
        assert b"protocol" in tgt.data_to_send()  # an ErrorMsg for the peer is queued


def test_out_of_order_sequence_is_a_protocol_error():
    _, tgt = handshake(None, None)
    tgt.receive_data(codec.encode_flush(2))
    with pytest.raises(RemoteProtocolError, match="seq 2 where 1"):
        tgt.next_events()


def test_data_before_handshake_is_refused():
    tgt = Connection(Role.TARGET)
    tgt.receive_data(codec.encode_flush(1))
    with pytest.raises(RemoteProtocolError, match="unexpected Flush"):
        tgt.next_events()
    assert tgt.state is State.CLOSED


@given(junk=st.binary(min_size=1, max_size=300), role=st.sampled_from([Role.SOURCE, Role.TARGET]))
@settings(max_examples=300, deadline=None)
def test_garbage_only_ever_raises_wire_errors(junk, role):
    conn = Connection(role)
    if role is Role.SOURCE:
        conn.start(hello())
    conn.receive_data(junk)
    try:
        conn.next_events()
    except WireError:
        return


@given(body=st.binary(max_size=200), ftype=st.sampled_from(sorted(codec._JSON_TYPES)))
@settings(max_examples=200, deadline=None)
def test_well_framed_nonsense_payloads_only_raise_wire_errors(body, ftype):
    conn = Connection(Role.TARGET)
    conn.receive_data(codec._frame(ftype, body) + body)
    try:
        conn.next_events()
    except WireError:
        pass


def test_oversized_frame_header_is_refused_without_buffering_it():
    import struct
    tgt = Connection(Role.TARGET)
    tgt.receive_data(struct.pack(">IBBHQQQ", codec.MAX_PAYLOAD + 1, codec.T_WRITE, 0, 0, 1, 0, 0))
    with pytest.raises(RemoteProtocolError, match="too large"):
        tgt.next_events()


# -- every frame type, every field -----------------------------------------------------------------
U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
INT = st.integers(min_value=0, max_value=codec.MAX_INT)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=codec.MAX_NAME)
HEX = st.binary(max_size=64)
EVENTS = st.one_of(
    st.builds(Hello, INT, st.uuids().map(str), TEXT, st.integers(1, codec.MAX_INT), st.integers(1, 1 << 30), INT,
              HEX, TEXT, st.lists(TEXT, max_size=32).map(tuple)),
    st.builds(Challenge, INT, HEX, HEX, st.booleans()),
    st.builds(Auth, HEX),
    st.builds(Welcome, TEXT, TEXT, st.booleans(), INT, st.booleans(), INT, INT),
    st.builds(ErrorMsg, st.text(st.characters(blacklist_categories=("Cs",)), max_size=2000).map(
        lambda t: "".join(c if c.isprintable() else " " for c in t)),  # what a peer's message becomes
              st.text(st.characters(blacklist_categories=("Cs",)), max_size=64)),
    st.builds(Bye),
    st.builds(Write, U64, U64, st.binary(max_size=5000).map(memoryview), st.booleans()),
    st.builds(Zero, U64, U64, U64, st.booleans(), st.booleans()),
    st.builds(Flush, U64), st.builds(Ack, U64), st.builds(Ping, U64),
    st.builds(Checkpoint, U64, st.integers(1, codec.MAX_INT), INT),
    st.builds(HashQuery, INT, INT, st.integers(0, 64), st.lists(INT, max_size=100).map(tuple)),
    st.builds(HashReply, U64, st.binary(max_size=40).map(lambda b: b[:len(b) // 16 * 16])),
)


def plain(ev):
    return (type(ev), ev.seq, ev.offset, bytes(ev.data), ev.fua) if isinstance(ev, Write) else ev


@given(evs=st.lists(EVENTS, min_size=1, max_size=8), split=st.integers(1, 3000))
@settings(max_examples=300, deadline=None)
def test_every_event_with_any_valid_fields_survives_encode_and_decode_at_any_split(evs, split):
    data = b"".join(codec.encode(e) for e in evs)
    reader = codec.FrameReader(4096)
    got = []
    for i in range(0, len(data), split):
        reader.feed(data[i:i + split])
        got += [plain(e) for e in reader.frames()]
    assert got == [plain(e) for e in evs]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)
ANY_INT = st.integers() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
HEXSTR = st.binary(max_size=80).map(bytes.hex)
# Per field: values of roughly the right type (any int, bools among them, long strings) or any JSON.
FIELD = {"version": ANY_INT, "volume_uuid": st.uuids().map(str) | TEXT, "name": st.text(max_size=300),
         "size": ANY_INT, "block_size": ANY_INT, "generation": ANY_INT, "nonce": HEXSTR, "mode": TEXT,
         "caps": st.lists(st.text(max_size=300), max_size=40), "proof": HEXSTR, "auth": st.booleans(),
         "replica_id": TEXT, "replica_name": TEXT, "created": st.booleans() | ANY_INT,
         "message": st.text(max_size=3000), "code": st.text(max_size=100), "req": ANY_INT,
         "leaf_size": ANY_INT, "level": ANY_INT, "indices": st.lists(ANY_INT, max_size=20),
         "verify": st.booleans() | ANY_INT, "checkpoint": ANY_INT, "checkpoint_time_ns": ANY_INT}
CONTROL_KEYS = {
    codec.T_HELLO: ["version", "volume_uuid", "name", "size", "block_size", "generation", "nonce", "mode", "caps"],
    codec.T_CHALLENGE: ["version", "nonce", "proof", "auth"],
    codec.T_AUTH: ["proof"],
    codec.T_WELCOME: ["replica_id", "replica_name", "created", "generation", "verify", "checkpoint",
                      "checkpoint_time_ns"],
    codec.T_ERROR: ["message", "code"],
    codec.T_HASHQ: ["req", "leaf_size", "level", "indices"],
}


def _fields_in_bounds(ev) -> None:
    for k, v in vars(ev).items():
        assert not isinstance(v, float)
        if isinstance(v, int) and not isinstance(v, bool):
            assert 0 <= v <= codec.MAX_INT, (k, v)
            if k in ("size", "block_size"):
                assert v >= 1, (k, v)
        if isinstance(v, str):
            assert len(v) <= 2000, k
    if isinstance(ev, HashQuery):
        assert all(type(i) is int and i >= 0 for i in ev.indices) and len(ev.indices) <= codec.MAX_QUERY_INDICES


@given(ftype=st.sampled_from(sorted(CONTROL_KEYS)), data=st.data())
@settings(max_examples=400, deadline=None)
def test_control_frames_with_any_json_field_values_decode_in_bounds_or_raise_protocol_errors(ftype, data):
    keys = CONTROL_KEYS[ftype]
    obj = {k: data.draw(FIELD[k] | JSON if data.draw(st.integers(0, 9), label=f"{k} any JSON") == 0 else FIELD[k],
                        label=k)
           for k in keys if data.draw(st.integers(0, 19), label=f"{k} missing") != 0}
    import json

    payload = json.dumps(obj).encode()
    reader = codec.FrameReader()
    reader.feed(codec._frame(ftype, payload) + payload)
    try:
        (ev,) = reader.frames()
    except RemoteProtocolError:
        return
    _fields_in_bounds(ev)


@given(ftype=st.sampled_from(sorted(codec._KNOWN_TYPES)), flags=st.integers(0, 255), a=U64, b=U64,
       payload=st.binary(max_size=64), role=st.sampled_from([Role.SOURCE, Role.TARGET]))
@settings(max_examples=400, deadline=None)
def test_any_well_checksummed_header_after_the_handshake_only_raises_wire_errors(ftype, flags, a, b, payload, role):
    src, tgt = handshake(None, None)
    conn = src if role is Role.SOURCE else tgt
    conn.receive_data(codec._frame(ftype, payload, flags, a, b) + payload)
    try:
        for ev in conn.next_events():
            if isinstance(ev, HashQuery | Hello):
                _fields_in_bounds(ev)
    except WireError:
        pass


def test_deeply_nested_json_is_a_protocol_error_not_a_recursion_error():
    body = b"[" * 100_000 + b"]" * 100_000
    src = Connection(Role.SOURCE)
    src.start(hello())
    src.receive_data(codec._frame(codec.T_CHALLENGE, body) + body)  # the source takes big control frames
    with pytest.raises(RemoteProtocolError, match="nested too deeply"):
        src.next_events()


def test_a_target_takes_only_small_frames_until_the_source_has_authenticated():
    import struct

    tgt = Connection(Role.TARGET, reader=codec.FrameReader(4096))
    tgt.receive_data(struct.pack(">IBBHQQQ", codec.PRE_AUTH_PAYLOAD + 1, codec.T_HELLO, 0, 0, 0, 0, 0))
    with pytest.raises(RemoteProtocolError, match="too large"):
        tgt.next_events()
    assert tgt.reader.capacity == 4096  # nothing was buffered for it
    _, ready = handshake(None, None)
    assert ready.reader.max_payload == codec.MAX_PAYLOAD


@pytest.mark.parametrize("field,value", [("volume_uuid", "../../etc"), ("volume_uuid", UUID.upper()),
                                         ("size", 0), ("size", True), ("size", 1.5), ("generation", -1),
                                         ("name", "x" * 256), ("caps", ["a"] * 33), ("block_size", 1 << 31)])
def test_hello_fields_out_of_bounds_are_refused(field, value):
    import json

    d = json.loads(codec.encode(hello())[codec.HEADER_SIZE:])
    d[field] = value
    payload = json.dumps(d).encode()
    tgt = Connection(Role.TARGET)
    tgt.receive_data(codec._frame(codec.T_HELLO, payload) + payload)
    with pytest.raises(RemoteProtocolError, match=field):
        tgt.next_events()


def test_a_peer_error_message_cannot_inject_lines_into_our_log():
    src = Connection(Role.SOURCE)
    src.start(hello())
    src.receive_data(codec.encode(ErrorMsg("bad\nvdisk target: forged line\x1b[2J", "x")))
    with pytest.raises(PeerError) as e:
        src.next_events()
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "forged line" in str(e.value)


# -- checkpoints (async sessions) ------------------------------------------------------------------
def test_a_checkpoint_is_a_data_frame_that_takes_the_next_seq():
    _, tgt = handshake(None, None, mode="async")
    tgt.receive_data(codec.encode_flush(1) + codec.encode_checkpoint(2, 7, 123) + codec.encode_flush(3))
    assert tgt.next_events() == [Flush(1), Checkpoint(2, 7, 123), Flush(3)]
    assert Checkpoint(2, 7, 123) != (2, 7, 123) and Checkpoint(3, 0, 0) != Zero(3, 0, 0)  # typed equality
    tgt.receive_data(codec.encode_checkpoint(5, 8, 0))
    with pytest.raises(RemoteProtocolError, match="seq 5 where 4"):
        tgt.next_events()


def test_checkpoint_ids_rise_within_a_session():
    _, tgt = handshake(None, None, mode="async")
    tgt.receive_data(codec.encode_checkpoint(1, 7, 0) + codec.encode_checkpoint(2, 7, 0))
    with pytest.raises(RemoteProtocolError, match="checkpoint 7 after checkpoint 7"):
        tgt.next_events()


def test_a_checkpoint_in_a_sync_session_is_refused():
    _, tgt = handshake(None, None, mode="sync")
    tgt.receive_data(codec.encode_checkpoint(1, 1, 0))
    with pytest.raises(RemoteProtocolError, match="in a sync session"):
        tgt.next_events()
    assert b"protocol" in tgt.data_to_send()


@pytest.mark.parametrize("cp_id,time_ns,payload,flags,match", [
    (0, 0, None, 0, "checkpoint id 0"),
    (codec.MAX_INT + 1, 0, None, 0, "checkpoint id"),
    ((1 << 64) - 1, 0, None, 0, "checkpoint id"),
    (1, 0, (codec.MAX_INT + 1).to_bytes(8, "big"), 0, "checkpoint time"),
    (1, 0, b"\0" * 7, 0, "wrong size"),
    (1, 0, b"\0" * 9, 0, "wrong size"),
    (1, 0, None, 1, "unknown flags"),
])
def test_checkpoint_fields_out_of_bounds_are_refused(cp_id, time_ns, payload, flags, match):
    payload = time_ns.to_bytes(8, "big") if payload is None else payload
    reader = codec.FrameReader()
    reader.feed(codec._frame(codec.T_CHECKPOINT, payload, flags, 1, cp_id) + payload)
    with pytest.raises(RemoteProtocolError, match=match):
        reader.frames()


@pytest.mark.parametrize("cp_id,time_ns", [(0, 0), (-1, 0), (1, -1), (codec.MAX_INT + 1, 0), (1, codec.MAX_INT + 1)])
def test_encoding_a_checkpoint_out_of_range_is_our_bug(cp_id, time_ns):
    from mirror.wire import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        codec.encode_checkpoint(1, cp_id, time_ns)


@given(seq=U64, cp_id=st.integers(1, codec.MAX_INT), time_ns=INT, split=st.integers(1, 40))
@settings(max_examples=100, deadline=None)
def test_checkpoint_frames_round_trip_at_any_split(seq, cp_id, time_ns, split):
    data = codec.encode_checkpoint(seq, cp_id, time_ns) * 2
    reader = codec.FrameReader(64)
    got = []
    for i in range(0, len(data), split):
        reader.feed(data[i:i + split])
        got += reader.frames()
    assert got == [Checkpoint(seq, cp_id, time_ns)] * 2


def _welcome_payload(**over) -> bytes:
    import json

    d = {"replica_id": "rid", "replica_name": "vol", "created": False, "generation": 3}
    d.update(over)
    return json.dumps(d).encode()


def test_a_welcome_from_an_older_target_decodes_with_no_checkpoint():
    reader = codec.FrameReader()
    payload = _welcome_payload()
    reader.feed(codec._frame(codec.T_WELCOME, payload) + payload)
    (w,) = reader.frames()
    assert (w.verify, w.checkpoint, w.checkpoint_time_ns) == (False, 0, 0)
    full = Welcome("rid", "vol", False, 3, True, 41, 1_700_000_000_000_000_000)
    reader.feed(codec.encode(full))
    assert reader.frames() == [full]


@pytest.mark.parametrize("field,value", [("checkpoint", -1), ("checkpoint", True), ("checkpoint", 1.0),
                                         ("checkpoint", "3"), ("checkpoint", codec.MAX_INT + 1),
                                         ("checkpoint_time_ns", -5), ("checkpoint_time_ns", None),
                                         ("checkpoint_time_ns", [1]), ("verify", 1)])
def test_welcome_checkpoint_fields_out_of_bounds_are_refused(field, value):
    reader = codec.FrameReader()
    payload = _welcome_payload(**{field: value})
    reader.feed(codec._frame(codec.T_WELCOME, payload) + payload)
    with pytest.raises(RemoteProtocolError, match=field):
        reader.frames()


@pytest.mark.parametrize("mode", ["", "Sync", "async ", "semi", "x" * 200])
def test_an_unknown_mirror_mode_is_refused(mode):
    src = Connection(Role.SOURCE)
    tgt = Connection(Role.TARGET)
    src.start(hello(mode=mode))
    with pytest.raises(RemoteProtocolError, match="unknown mirror mode"):
        pump(src, tgt)
    with pytest.raises(PeerError, match="unknown mirror mode"):
        pump(tgt, src)


def test_both_modes_complete_the_handshake():
    for mode in ("sync", "async"):
        _, tgt = handshake(None, None, mode=mode)
        assert tgt.hello is not None and tgt.hello.mode == mode
