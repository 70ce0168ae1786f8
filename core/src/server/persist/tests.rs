use proptest::prelude::*;

use super::*;
use crate::bstar::Role;
use crate::kvmsg::{BstarState, KvMsg, Uuid};
use crate::server::{Config, HashKey, Output, Server};
use crate::time::{EpochMillis, Instant};

const WALL: EpochMillis = EpochMillis(1_700_000_000_000);
fn key() -> HashKey {
    HashKey::from_bytes([0x5a; 16])
}

fn active_primary() -> Server {
    let config = Config {
        persistence: true,
        ..Config::primary()
    };
    let mut server = Server::new(Instant::ZERO, WALL, config, key()).unwrap();
    server.handle_peer_state(Instant::ZERO, WALL, &[BstarState::Backup.encode()]);
    assert_eq!(server.state(), BstarState::Active);
    server
}

fn set(server: &mut Server, key: &str, value: &str, uuid: u8) {
    let update = KvMsg::kvset(
        key.as_bytes().to_vec(),
        value.as_bytes().to_vec(),
        Uuid::from_bytes([uuid; 16]),
    );
    server.handle_collected(Instant::ZERO, WALL, &update.encode());
}

/// Drains the outputs: the log bytes of every record, and the kinds in order.
fn drain(server: &mut Server, log: &mut Vec<u8>) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    while let Some(output) = server.poll_output() {
        match output {
            Output::Persist(record) => {
                record.encode_into(log);
                kinds.push("persist");
            }
            Output::PersistImage(_) => kinds.push("image"),
            Output::Publish(_) => kinds.push("publish"),
            _ => {}
        }
    }
    kinds
}

fn snapshot_bytes(image: &Image) -> Vec<u8> {
    let mut file = encode_header(FileKind::Snapshot, 7).to_vec();
    let mut buffer = Vec::new();
    image
        .encode(&mut buffer, 64, |chunk| {
            file.append(chunk);
            Ok::<(), ()>(())
        })
        .unwrap();
    file
}

/// Reads every whole record of `bytes` (after the header) into `restorer`; returns the
/// kinds applied and where reading stopped.
fn read_all(restorer: &mut Restorer, bytes: &[u8]) -> (Vec<Applied>, Option<Torn>) {
    let mut rest = &bytes[HEADER_LEN..];
    let mut applied = Vec::new();
    loop {
        match next_record(rest) {
            NextRecord::Record { payload, consumed } => {
                applied.push(restorer.apply(payload).unwrap());
                rest = &rest[consumed..];
            }
            NextRecord::End => return (applied, None),
            NextRecord::Torn(torn) => return (applied, Some(torn)),
        }
    }
}

#[test]
fn a_record_comes_before_the_publish_it_makes_durable() {
    let mut server = active_primary();
    drain(&mut server, &mut Vec::new());
    set(&mut server, "/a", "1", 1);
    let kinds = drain(&mut server, &mut Vec::new());
    assert_eq!(kinds, ["persist", "publish"]);
}

#[test]
fn a_record_names_the_key_and_sequence_it_changes_and_a_history_record_neither() {
    let mut server = active_primary();
    drain(&mut server, &mut Vec::new());
    set(&mut server, "/a", "1", 1);
    set(&mut server, "/b", "2", 2);
    let records: Vec<Record> = std::iter::from_fn(|| server.poll_output())
        .filter_map(|output| match output {
            Output::Persist(record) => Some(record),
            _ => None,
        })
        .collect();
    let [first, second] = &records[..] else {
        panic!("two records expected, got {records:?}");
    };
    let last = server.sequence();
    assert!(last > 1);
    assert_eq!(
        [first.key(), second.key()],
        [Some(&b"/a"[..]), Some(&b"/b"[..])]
    );
    assert_eq!(
        [first.sequence(), second.sequence()],
        [Some(last - 1), Some(last)]
    );
    assert_eq!(first.history(), None);
    let history = Record::of_history(History::default());
    assert_eq!((history.key(), history.sequence()), (None, None));
    assert_eq!(history.history(), Some(&History::default()));
}

#[test]
fn an_image_is_flushed_in_chunks_of_at_least_the_chunk_size_and_once_at_the_end() {
    let mut server = active_primary();
    assert!(server.image().is_empty());
    for index in 0..10u8 {
        set(&mut server, &format!("/key/{index}"), "value", index + 1);
    }
    drain(&mut server, &mut Vec::new());
    let image = server.image();
    let encode = |chunk: usize| {
        let (mut bytes, mut flushes) = (Vec::new(), Vec::new());
        let entries = image
            .encode(&mut Vec::new(), chunk, |out| {
                flushes.push(out.len());
                bytes.append(out);
                Ok::<(), ()>(())
            })
            .unwrap();
        (entries, bytes, flushes)
    };
    let (entries, whole, flushes) = encode(usize::MAX);
    assert_eq!((entries, flushes.len()), (10, 1), "only the final flush");
    let (entries, chunked, flushes) = encode(64);
    assert_eq!(entries, 10);
    assert_eq!(chunked, whole);
    assert!(flushes.len() > 2, "{flushes:?}");
    let (last, full) = flushes.split_last().unwrap();
    assert!(full.iter().all(|len| *len >= 64), "{flushes:?}");
    assert!(*last > 0);
}

#[test]
fn a_delete_record_takes_a_key_of_1_to_255_bytes() {
    let delete = |key_len: usize| {
        let mut payload = vec![TAG_DELETE];
        payload.extend_from_slice(&7i64.to_be_bytes());
        payload.extend(std::iter::repeat_n(b'k', key_len));
        Restorer::new().apply(&payload)
    };
    assert_eq!(delete(0), Err(RecordError::BadKey));
    assert_eq!(delete(1), Ok(Applied::Delete));
    assert_eq!(delete(255), Ok(Applied::Delete));
    assert_eq!(delete(256), Err(RecordError::BadKey));
}

#[test]
fn without_persistence_no_record_is_emitted() {
    let mut server = Server::new(Instant::ZERO, WALL, Config::primary(), key()).unwrap();
    server.handle_peer_state(Instant::ZERO, WALL, &[BstarState::Backup.encode()]);
    set(&mut server, "/a", "1", 1);
    assert!(!drain(&mut server, &mut Vec::new()).contains(&"persist"));
}

#[test]
fn a_snapshot_and_its_log_restore_the_map_and_numbering() {
    let mut server = active_primary();
    drain(&mut server, &mut Vec::new());
    set(&mut server, "/a", "1", 1);
    set(&mut server, "/b", "2", 2);
    drain(&mut server, &mut Vec::new());
    let image = server.image();
    assert_eq!(
        (image.sequence(), image.highest_published(), image.len()),
        (2, 2, 2)
    );
    assert!(!image.is_empty());
    let snapshot = snapshot_bytes(&image);
    let mut log = encode_header(FileKind::Log, 7).to_vec();
    set(&mut server, "/a", "3", 3);
    let delete = KvMsg::kvset_delete(b"/b".to_vec(), Uuid::from_bytes([4; 16]));
    server.handle_collected(Instant::ZERO, WALL, &delete.encode());
    set(&mut server, "/c", "5", 5);
    drain(&mut server, &mut log);

    assert_eq!(
        decode_header(&snapshot),
        Ok(Header {
            kind: FileKind::Snapshot,
            generation: 7
        })
    );
    let mut restorer = Restorer::new();
    assert!(restorer.is_empty());
    let (applied, torn) = read_all(&mut restorer, &snapshot);
    assert_eq!(torn, None);
    assert_eq!((restorer.sequence(), restorer.len()), (2, 2));
    assert!(!restorer.is_empty());
    assert_eq!(
        applied,
        [
            Applied::State,
            Applied::History,
            Applied::Put,
            Applied::Put,
            Applied::End { entries: 2 }
        ]
    );
    let (applied, torn) = read_all(&mut restorer, &log);
    assert_eq!(torn, None);
    assert_eq!(applied, [Applied::Put, Applied::Delete, Applied::Put]);
    let restored = restorer.finish();
    assert_eq!(restored.sequence(), 5);
    assert_eq!((restored.highest_published(), restored.len()), (5, 2));
    assert!(!restored.is_empty());
    assert!(Restorer::new().finish().is_empty());

    let mut config = Config::primary();
    config.persistence = true;
    let mut again = Server::restore(Instant::ZERO, WALL, config, key(), restored).unwrap();
    let keys: Vec<(Vec<u8>, Vec<u8>, i64)> = again
        .iter()
        .map(|(key, entry)| (key.to_vec(), entry.body().to_vec(), entry.sequence()))
        .collect();
    let expected: Vec<(Vec<u8>, Vec<u8>, i64)> = server
        .iter()
        .map(|(key, entry)| (key.to_vec(), entry.body().to_vec(), entry.sequence()))
        .collect();
    assert_eq!(keys, expected);
    assert_eq!(again.bstar().role(), Role::Primary);
    again.handle_peer_state(Instant::ZERO, WALL, &[BstarState::Backup.encode()]);
    drain(&mut again, &mut Vec::new());
    set(&mut again, "/d", "6", 6);
    assert_eq!(
        again.sequence(),
        6,
        "numbering continues above the restored one"
    );
}

#[test]
fn a_restored_entry_past_its_ttl_is_deleted_before_anything_is_served() {
    let mut server = active_primary();
    let update = KvMsg::kvset(b"/t".to_vec(), b"v".to_vec(), Uuid::from_bytes([1; 16]))
        .with_ttl(std::time::Duration::from_secs(1));
    server.handle_collected(Instant::ZERO, WALL, &update.encode());
    let mut restorer = Restorer::new();
    read_all(&mut restorer, &snapshot_bytes(&server.image()));
    let restored = restorer.finish();
    assert_eq!(
        restored.get(b"/t").and_then(Entry::expires_at),
        Some(EpochMillis(WALL.0 + 1000)),
        "the ttl is stored as an absolute expiry"
    );
    let later = EpochMillis(WALL.0 + 5000);
    let mut config = Config::primary();
    config.persistence = true;
    let mut again = Server::restore(Instant::ZERO, later, config, key(), restored).unwrap();
    again.handle_peer_state(Instant::ZERO, later, &[BstarState::Backup.encode()]);
    assert!(again.get(b"/t").is_none());
    assert_eq!(again.sequence(), 2, "the expiry is published as a delete");
}

#[test]
fn a_torn_tail_stops_reading_at_the_last_whole_record() {
    let mut server = active_primary();
    drain(&mut server, &mut Vec::new());
    let mut log = encode_header(FileKind::Log, 1).to_vec();
    set(&mut server, "/a", "1", 1);
    drain(&mut server, &mut log);
    let whole = log.len();
    set(&mut server, "/b", "2", 2);
    drain(&mut server, &mut log);
    for cut in whole + 1..log.len() {
        let mut restorer = Restorer::new();
        let (applied, torn) = read_all(&mut restorer, &log[..cut]);
        assert_eq!(applied, [Applied::Put], "cut at {cut}");
        assert!(torn.is_some(), "cut at {cut}");
    }
    let mut damaged = log.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    let (applied, torn) = read_all(&mut Restorer::new(), &damaged);
    assert_eq!(applied, [Applied::Put]);
    assert!(matches!(torn, Some(Torn::ChecksumMismatch { .. })));
}

#[test]
fn headers_of_another_version_or_program_are_refused_by_name() {
    let mut header = encode_header(FileKind::Log, 3);
    assert_eq!(
        decode_header(&header),
        Ok(Header {
            kind: FileKind::Log,
            generation: 3
        })
    );
    header[11] = 1;
    assert!(
        matches!(decode_header(&header), Err(HeaderError::Corrupt)),
        "version 1 is read (its checksum no longer matches after this edit)"
    );
    header[11] = 3;
    assert_eq!(
        decode_header(&header),
        Err(HeaderError::UnsupportedVersion { found: 3 })
    );
    assert_eq!(
        decode_header(b"hello world, this is no header"),
        Err(HeaderError::NotClonekv)
    );
    assert_eq!(
        decode_header(&MAGIC),
        Err(HeaderError::Truncated { found: 8 })
    );
    let mut damaged = encode_header(FileKind::Log, 3);
    damaged[20] ^= 1;
    assert_eq!(decode_header(&damaged), Err(HeaderError::Corrupt));
}

proptest! {
    /// Whatever the bytes after a header, reading never panics and never applies a
    /// record whose checksum does not match.
    #[test]
    fn any_bytes_read_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut restorer = Restorer::new();
        let mut rest = bytes.as_slice();
        while let NextRecord::Record { payload, consumed } = next_record(rest) {
            let _ = restorer.apply(payload);
            rest = &rest[consumed..];
        }
        let _ = decode_header(&bytes);
    }

    /// Any sequence of writes and deletes, logged and read back, gives the same map.
    #[test]
    fn a_logged_history_reads_back_to_the_same_map(
        ops in proptest::collection::vec((0u8..6, any::<bool>(), 0u8..200), 1..40)
    ) {
        let mut server = active_primary();
        drain(&mut server, &mut Vec::new());
        let mut log = encode_header(FileKind::Log, 1).to_vec();
        for (index, (key, delete, value)) in ops.into_iter().enumerate() {
            let key = format!("/k{key}").into_bytes();
            let uuid = Uuid::from_bytes([index as u8; 16]);
            let update = if delete {
                KvMsg::kvset_delete(key, uuid)
            } else {
                KvMsg::kvset(key, vec![value; usize::from(value % 7)], uuid)
            };
            server.handle_collected(Instant::ZERO, WALL, &update.encode());
        }
        drain(&mut server, &mut log);
        let mut restorer = Restorer::new();
        let (_, torn) = read_all(&mut restorer, &log);
        prop_assert_eq!(torn, None);
        let restored = restorer.finish();
        prop_assert_eq!(restored.sequence(), server.sequence());
        let again = Server::restore(Instant::ZERO, WALL, Config::primary(), key(), restored).unwrap();
        let ours: Vec<_> = server.iter().map(|(k, e)| (k.to_vec(), e.clone())).collect();
        let theirs: Vec<_> = again.iter().map(|(k, e)| (k.to_vec(), e.clone())).collect();
        prop_assert_eq!(ours, theirs);
    }
}
