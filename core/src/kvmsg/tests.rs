use std::fmt::Write as _;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const UUID: Uuid = Uuid::from_bytes([
    0x9e, 0x1c, 0x3b, 0x42, 0x5d, 0x6f, 0x47, 0x80, 0x91, 0xa2, 0xb3, 0xc4, 0xd5, 0xe6, 0xf7, 0x08,
]);

fn limits() -> Limits {
    Limits::default()
}

/// One line per frame: its length, hex bytes and printable text, for byte snapshots.
fn dump<F: AsRef<[u8]>>(frames: &[F]) -> String {
    let mut out = String::new();
    for (index, frame) in frames.iter().enumerate() {
        let frame = frame.as_ref();
        let hex: String = frame.iter().map(|byte| format!("{byte:02x}")).collect();
        let text: String = frame
            .iter()
            .map(|&byte| match byte {
                b'\n' => "\\n".to_string(),
                0x20..=0x7e => char::from(byte).to_string(),
                _ => ".".to_string(),
            })
            .collect();
        let _ = writeln!(out, "frame {index} [{:>2}] {hex} '{text}'", frame.len());
    }
    out
}

fn stored(key: &str, sequence: i64, ttl: &str, body: &str) -> KvMsg {
    let mut message = KvMsg {
        key: key.as_bytes().to_vec(),
        sequence,
        uuid: Some(UUID),
        properties: Properties::new(),
        body: body.as_bytes().to_vec(),
    };
    message.properties.set(TTL, ttl.as_bytes()).unwrap();
    message
}

// --- The reference bytes of PROTOCOL.md §2 -----------------------------------------

#[test]
fn a_kvpub_has_the_reference_bytes() {
    let frames = stored("/client/6943", 5, "24", "569874").encode();
    assert_eq!(frames[0], b"/client/6943");
    assert_eq!(frames[1], [0, 0, 0, 0, 0, 0, 0, 5]);
    assert_eq!(frames[2], UUID.as_bytes());
    assert_eq!(frames[3], b"ttl=24\n");
    assert_eq!(frames[4], b"569874");
    insta::assert_snapshot!("kvpub", dump(&frames));
}

#[test]
fn a_hugz_has_the_reference_bytes() {
    let frames = KvMsg::hugz(5).encode();
    let expected: [&[u8]; 5] = [b"HUGZ", &[0, 0, 0, 0, 0, 0, 0, 5], b"", b"", b""];
    assert_eq!(frames, expected.map(<[u8]>::to_vec));
    insta::assert_snapshot!("hugz", dump(&frames));
}

#[test]
fn a_kvsync_has_the_reference_bytes_with_an_absolute_ttl() {
    let mut message = stored("/client/5416", 1, "0", "353646");
    message.set_ttl_expires_at(EpochMillis(1_795_268_619_620));
    let frames = message.encode();
    assert_eq!(frames[1], [0, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(frames[3], b"ttl=1795268619620\n");
    insta::assert_snapshot!("kvsync", dump(&frames));
}

#[test]
fn a_kthxbai_has_the_reference_bytes_and_carries_the_subtree_as_body() {
    let frames = KvMsg::kthxbai(4, Vec::new()).encode();
    let expected: [&[u8]; 5] = [b"KTHXBAI", &[0, 0, 0, 0, 0, 0, 0, 4], b"", b"", b""];
    assert_eq!(frames, expected.map(<[u8]>::to_vec));
    insta::assert_snapshot!("kthxbai", dump(&frames));
    assert_eq!(
        KvMsg::kthxbai(4, b"/client/".to_vec()).encode()[4],
        b"/client/"
    );
}

#[test]
fn a_published_delete_has_the_reference_bytes() {
    let frames = stored("/client/2579", 8, "1795268610624", "").encode();
    assert_eq!(frames[1], [0, 0, 0, 0, 0, 0, 0, 8]);
    assert_eq!(frames[3], b"ttl=1795268610624\n");
    assert!(frames[4].is_empty());
    insta::assert_snapshot!("delete", dump(&frames));
}

#[test]
fn a_kvset_has_sequence_zero_a_uuid_and_a_relative_ttl_in_seconds() {
    let message = KvMsg::kvset(b"/client/6943".to_vec(), b"569874".to_vec(), UUID)
        .with_ttl(Duration::from_secs(24));
    let frames = message.encode();
    assert_eq!(frames[1], [0; 8]);
    assert_eq!(frames[2].len(), 16);
    assert_eq!(frames[3], b"ttl=24\n");
    insta::assert_snapshot!("kvset", dump(&frames));
}

#[test]
fn a_snapshot_request_is_icanhaz_and_the_subtree() {
    let frames = SnapshotRequest::new(b"/client/".to_vec()).encode();
    assert_eq!(frames, [b"ICANHAZ?".to_vec(), b"/client/".to_vec()]);
    insta::assert_snapshot!("icanhaz", dump(&frames));
}

#[test]
fn binary_star_states_are_one_ascii_digit() {
    let frames: Vec<Vec<u8>> = BstarState::ALL.iter().map(|state| state.encode()).collect();
    assert_eq!(frames, [b"1", b"2", b"3", b"4"].map(|f| f.to_vec()));
    insta::assert_snapshot!("bstar_states", dump(&frames));
    for state in BstarState::ALL {
        assert_eq!(BstarState::decode(&[state.encode()]), Ok(state));
    }
}

// --- Every malformed-input class gets its own error ---------------------------------

fn frames(parts: [&[u8]; 5]) -> Vec<Vec<u8>> {
    parts.iter().map(|part| part.to_vec()).collect()
}

#[test]
fn every_malformed_input_class_is_rejected_with_a_distinct_error() {
    let seq = &5i64.to_be_bytes()[..];
    let uuid = &UUID.as_bytes()[..];
    let long_key = vec![b'k'; 256];
    let long_props = format!("a={}\n", "v".repeat(4096));
    let long_body = vec![b'b'; (1 << 20) + 1];
    let cases: Vec<(Vec<Vec<u8>>, DecodeError)> = vec![
        (
            frames([b"k", seq, uuid, b"", b"v"])[..4].to_vec(),
            DecodeError::FrameCount {
                expected: 5,
                actual: 4,
            },
        ),
        (frames([b"", seq, uuid, b"", b"v"]), DecodeError::EmptyKey),
        (
            frames([&long_key, seq, uuid, b"", b"v"]),
            DecodeError::KeyTooLong { len: 256, max: 255 },
        ),
        (
            frames([b"k", &[0, 5], uuid, b"", b"v"]),
            DecodeError::SequenceLength { len: 2 },
        ),
        (
            frames([b"k", seq, &[1, 2, 3], b"", b"v"]),
            DecodeError::UuidLength { len: 3 },
        ),
        (
            frames([b"k", seq, uuid, b"ttl=1\nnoequals\n", b"v"]),
            DecodeError::PropertyRecord {
                record: 1,
                problem: PropertyProblem::MissingEquals,
            },
        ),
        (
            frames([b"k", seq, uuid, b"=1\n", b"v"]),
            DecodeError::PropertyRecord {
                record: 0,
                problem: PropertyProblem::EmptyName,
            },
        ),
        (
            frames([b"k", seq, uuid, long_props.as_bytes(), b"v"]),
            DecodeError::PropertiesTooLarge {
                len: 4099,
                max: 4096,
            },
        ),
        (
            frames([b"k", seq, uuid, b"", &long_body]),
            DecodeError::BodyTooLarge {
                len: (1 << 20) + 1,
                max: 1 << 20,
            },
        ),
    ];
    let mut reasons = std::collections::BTreeSet::new();
    for (input, expected) in cases {
        assert_eq!(KvMsg::decode(&input, &limits()), Err(expected.clone()));
        reasons.insert(expected.reason());
    }
    let request_errors = [
        (
            SnapshotRequest::decode(&[b"ICANHAZ?".to_vec()], &limits()),
            DecodeError::FrameCount {
                expected: 2,
                actual: 1,
            },
        ),
        (
            SnapshotRequest::decode(&[b"GIMME".to_vec(), Vec::new()], &limits()),
            DecodeError::UnknownCommand,
        ),
        (
            SnapshotRequest::decode(&[b"ICANHAZ?".to_vec(), long_key.clone()], &limits()),
            DecodeError::SubtreeTooLong { len: 256, max: 255 },
        ),
    ];
    for (result, expected) in request_errors {
        assert_eq!(result, Err(expected.clone()));
        reasons.insert(expected.reason());
    }
    for bad_state in [&b"5"[..], b"", b"3\n", b"03"] {
        assert_eq!(
            BstarState::decode(&[bad_state]),
            Err(DecodeError::InvalidState)
        );
    }
    reasons.insert(DecodeError::InvalidState.reason());
    assert_eq!(
        reasons.len(),
        11,
        "each class has its own reason: {reasons:?}"
    );
}

#[test]
fn limits_are_configuration() {
    let tight = Limits {
        max_key_len: 3,
        max_body_len: 2,
        max_properties_len: 4,
    };
    let seq = &1i64.to_be_bytes()[..];
    assert!(KvMsg::decode(&frames([b"abc", seq, b"", b"a=1\n", b"xy"]), &tight).is_ok());
    assert!(KvMsg::decode(&frames([b"abcd", seq, b"", b"", b""]), &tight).is_err());
    assert!(KvMsg::decode(&frames([b"a", seq, b"", b"", b"xyz"]), &tight).is_err());
    assert!(KvMsg::decode(&frames([b"a", seq, b"", b"ab=12\n", b""]), &tight).is_err());
}

#[test]
fn negative_and_huge_sequences_decode_as_signed_big_endian() {
    for sequence in [i64::MIN, -1, 0, 1, 0x0102_0304_0506_0708, i64::MAX] {
        let message = KvMsg::hugz(sequence);
        let decoded = KvMsg::decode(&message.encode(), &limits()).unwrap();
        assert_eq!(decoded.sequence, sequence);
    }
    let frames = frames([b"k", &[0x01, 2, 3, 4, 5, 6, 7, 8], b"", b"", b""]);
    assert_eq!(
        KvMsg::decode(&frames, &limits()).unwrap().sequence,
        0x0102_0304_0506_0708
    );
}

#[test]
fn a_message_without_uuid_decodes_to_none_and_encodes_an_empty_frame() {
    let seq = &3i64.to_be_bytes()[..];
    let decoded = KvMsg::decode(&frames([b"k", seq, b"", b"", b"v"]), &limits()).unwrap();
    assert_eq!(decoded.uuid, None);
    assert!(decoded.encode()[2].is_empty());
}

// --- Properties ----------------------------------------------------------------------

#[test]
fn a_property_value_may_contain_equals_signs() {
    let properties = Properties::decode(b"url=a=b=c\n").unwrap();
    assert_eq!(properties.get("url"), Some(&b"a=b=c"[..]));
}

#[test]
fn a_final_record_without_newline_is_accepted_and_reencoded_with_one() {
    let properties = Properties::decode(b"a=1\nb=2").unwrap();
    assert_eq!(properties.get("b"), Some(&b"2"[..]));
    assert_eq!(properties.as_frame(), b"a=1\nb=2\n");
}

#[test]
fn setting_an_existing_property_replaces_it_in_place() {
    let mut properties = Properties::decode(b"a=1\nttl=5\nb=2\n").unwrap();
    properties.set("ttl", b"9").unwrap();
    assert_eq!(properties.as_frame(), b"a=1\nttl=9\nb=2\n");
    properties.set("c", b"").unwrap();
    assert_eq!(properties.as_frame(), b"a=1\nttl=9\nb=2\nc=\n");
    assert_eq!(properties.get("c"), Some(&b""[..]));
    properties.remove("ttl");
    assert_eq!(properties.as_frame(), b"a=1\nb=2\nc=\n");
}

#[test]
fn invalid_property_names_and_values_are_refused() {
    let mut properties = Properties::new();
    assert_eq!(properties.set("", b"x"), Err(PropertyError::InvalidName));
    assert_eq!(properties.set("a=b", b"x"), Err(PropertyError::InvalidName));
    assert_eq!(
        properties.set("a\nb", b"x"),
        Err(PropertyError::InvalidName)
    );
    assert_eq!(
        properties.set("a", b"x\ny"),
        Err(PropertyError::InvalidValue)
    );
    assert!(properties.is_empty());
}

#[test]
fn empty_records_are_malformed() {
    for frame in [&b"\n"[..], b"a=1\n\n", b"\na=1\n"] {
        assert!(
            matches!(
                Properties::decode(frame),
                Err(DecodeError::PropertyRecord {
                    problem: PropertyProblem::MissingEquals,
                    ..
                })
            ),
            "{frame:?}"
        );
    }
}

// --- TTL (§5) ---------------------------------------------------------------------

fn with_ttl(text: &str) -> KvMsg {
    let mut message = KvMsg::kvset(b"k".to_vec(), b"v".to_vec(), UUID);
    message.properties.set(TTL, text.as_bytes()).unwrap();
    message
}

#[test]
fn a_client_ttl_is_decimal_seconds_and_zero_or_absent_is_persistent() {
    let cases: [(&str, Result<Option<Duration>, TtlError>); 12] = [
        ("30", Ok(Some(Duration::from_secs(30)))),
        ("1.5", Ok(Some(Duration::from_millis(1500)))),
        ("1.500000", Ok(Some(Duration::from_millis(1500)))),
        (".25", Ok(Some(Duration::from_millis(250)))),
        ("2.", Ok(Some(Duration::from_secs(2)))),
        ("0", Ok(None)),
        ("0.000", Ok(None)),
        ("", Err(TtlError::NotANumber)),
        ("-1", Err(TtlError::NotANumber)),
        ("1e3", Err(TtlError::NotANumber)),
        (" 5", Err(TtlError::NotANumber)),
        ("99999999999999999999", Err(TtlError::Overflow)),
    ];
    for (text, expected) in cases {
        assert_eq!(with_ttl(text).client_ttl(), expected, "ttl={text:?}");
    }
    let no_ttl = KvMsg::kvset(b"k".to_vec(), b"v".to_vec(), UUID);
    assert_eq!(no_ttl.client_ttl(), Ok(None));
    assert_eq!(with_ttl("1.2.3").client_ttl(), Err(TtlError::NotANumber));
    assert_eq!(with_ttl(".").client_ttl(), Err(TtlError::NotANumber));
}

#[test]
fn a_peer_ttl_is_told_apart_by_magnitude_and_decimal_point() {
    let cases: [(&str, Option<Ttl>); 6] = [
        (
            "1795268619620",
            Some(Ttl::ExpiresAt(EpochMillis(1_795_268_619_620))),
        ),
        (
            "1795268619.620000",
            Some(Ttl::ExpiresAt(EpochMillis(1_795_268_619_620))),
        ),
        ("24", Some(Ttl::Relative(Duration::from_secs(24)))),
        ("1.5", Some(Ttl::Relative(Duration::from_millis(1500)))),
        // An integer below 10^11 is relative seconds, however large.
        (
            "1795268619",
            Some(Ttl::Relative(Duration::from_secs(1_795_268_619))),
        ),
        ("0", None),
    ];
    for (text, expected) in cases {
        assert_eq!(with_ttl(text).peer_ttl(), Ok(expected), "ttl={text:?}");
    }
    assert_eq!(with_ttl("soon").peer_ttl(), Err(TtlError::NotANumber));
}

#[test]
fn ttls_are_written_as_clients_and_servers_write_them() {
    assert_eq!(format_ttl_seconds(Duration::from_secs(24)), "24");
    assert_eq!(format_ttl_seconds(Duration::from_millis(1500)), "1.5");
    assert_eq!(format_ttl_seconds(Duration::from_millis(1005)), "1.005");
    let mut message = with_ttl("7");
    message.set_ttl_relative(Duration::ZERO);
    assert_eq!(message.properties.get(TTL), None);
    message.set_ttl_expires_at(EpochMillis(1_795_268_610_624));
    assert_eq!(message.properties.as_frame(), b"ttl=1795268610624\n");
}

#[test]
fn a_server_marks_its_hugz_with_its_binary_star_state() {
    let active = KvMsg::hugz_from(BstarState::Active, 5);
    assert_eq!(active.encode()[3], b"state=active\n");
    assert_eq!(active.hugz_state(), Some(BstarState::Active));
    let passive = KvMsg::hugz_from(BstarState::Passive, 5);
    assert_eq!(passive.encode()[3], b"state=passive\n");
    assert_eq!(passive.hugz_state(), Some(BstarState::Passive));
    // The references' HUGZ carry no mark: their state is unknown.
    assert_eq!(KvMsg::hugz(5).hugz_state(), None);
    let mut odd = KvMsg::hugz(5);
    odd.properties.set(STATE, b"confused").unwrap();
    assert_eq!(odd.hugz_state(), None);
    insta::assert_snapshot!("hugz_passive", dump(&passive.encode()));
    insta::assert_snapshot!("hugz_active", dump(&active.encode()));
}

#[test]
fn reserved_keys_are_recognised() {
    assert!(KvMsg::hugz(1).is_hugz());
    assert!(KvMsg::kthxbai(1, Vec::new()).is_kthxbai());
    assert!(KvMsg::kvset(b"HUGZ".to_vec(), b"x".to_vec(), UUID).has_reserved_key());
    assert!(!KvMsg::kvset(b"/HUGZ".to_vec(), b"x".to_vec(), UUID).has_reserved_key());
    assert!(KvMsg::kvset_delete(b"k".to_vec(), UUID).is_delete());
}

// --- Properties of the codec ---------------------------------------------------------

prop_compose! {
    fn property_records()(
        records in prop::collection::vec(
            ("[a-z_][a-z0-9_=]{0,8}".prop_map(|n| n.replace('=', "")).prop_filter("non-empty", |n| !n.is_empty()),
             prop::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..16)),
            0..5)
    ) -> Properties {
        let mut properties = Properties::new();
        for (name, value) in records {
            properties.set(&name, &value).unwrap();
        }
        properties
    }
}

prop_compose! {
    fn messages()(
        key in prop::collection::vec(any::<u8>(), 1..=255),
        sequence in any::<i64>(),
        uuid in prop::option::of(any::<[u8; 16]>()),
        properties in property_records(),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) -> KvMsg {
        KvMsg { key, sequence, uuid: uuid.map(Uuid::from_bytes), properties, body }
    }
}

proptest! {
    #[test]
    fn uuids_order_as_their_bytes(a in any::<[u8; 16]>(), b in any::<[u8; 16]>()) {
        prop_assert_eq!(Uuid::from_bytes(a).cmp(&Uuid::from_bytes(b)), a.cmp(&b));
    }

    #[test]
    fn decode_inverts_encode_for_any_message_within_limits(message in messages()) {
        let decoded = KvMsg::decode(&message.encode(), &limits());
        prop_assert_eq!(decoded, Ok(message));
    }

    #[test]
    fn decode_never_panics_on_arbitrary_frames(
        input in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8)
    ) {
        if let Ok(message) = KvMsg::decode(&input, &limits()) {
            // Whatever decodes re-encodes to the same bytes, up to the final newline of
            // the properties frame that the decoder restores.
            let encoded = message.encode();
            prop_assert_eq!(&encoded[0], &input[0]);
            prop_assert_eq!(&encoded[4], &input[4]);
            prop_assert_eq!(KvMsg::decode(&encoded, &limits()), Ok(message));
        }
        let _ = SnapshotRequest::decode(&input, &limits());
        let _ = BstarState::decode(&input);
    }

    #[test]
    fn ttl_parsing_never_panics(text in "[0-9.]{0,45}|\\PC{0,20}") {
        let message = with_ttl(&text.replace('\n', ""));
        let _ = message.client_ttl();
        let _ = message.peer_ttl();
    }

    #[test]
    fn whole_second_ttls_round_trip_through_the_client_form(seconds in 1u64..10_000_000, millis in 0u64..1000) {
        let ttl = Duration::from_secs(seconds) + Duration::from_millis(millis);
        let message = KvMsg::kvset(b"k".to_vec(), b"v".to_vec(), UUID).with_ttl(ttl);
        prop_assert_eq!(message.client_ttl(), Ok(Some(ttl)));
    }
}

#[test]
fn a_borrowed_decode_reads_what_an_owned_one_does_without_copying() {
    let frames: [&[u8]; 5] = [b"/k", &7i64.to_be_bytes(), &[9; 16], b"ttl=5\nx=1", b"v"];
    let view = KvMsgRef::decode(&frames, &Limits::default()).unwrap();
    let owned = KvMsg::decode(&frames, &Limits::default()).unwrap();
    assert_eq!(view.to_kvmsg(), owned);
    assert_eq!(owned.as_msg_ref().to_kvmsg(), owned);
    assert!(std::ptr::eq(view.body, frames[4]));
    // The last record lacked its newline: normalised as the owned form holds it.
    assert_eq!(&*view.normalized_properties(), owned.properties.as_frame());
    assert!(matches!(
        view.normalized_properties(),
        std::borrow::Cow::Owned(_)
    ));
    assert!(matches!(
        owned.as_msg_ref().normalized_properties(),
        std::borrow::Cow::Borrowed(_)
    ));
    assert_eq!(view.client_ttl(), owned.client_ttl());
    assert_eq!(view.peer_ttl(), owned.peer_ttl());
}
